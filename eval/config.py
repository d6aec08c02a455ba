"""The `vlhooks compare` configuration: the embedded toy default, loading a YAML file, and checking the whole
config (arms, injection, blend, sampling, the DiT's blocks on the meta device) before anything heavy runs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from vlhooks.errors import CompareError, VLHooksError

from .arms import Arm, plan_arms

TOY_DEFAULT: dict[str, Any] = {
    "world": "toy",
    "dit": "checkpoints/toy-dit/final",
    "classifier": "checkpoints/toy-classifier",
    "encoder": {"name": "dinov2-small", "image_size": 56, "include_cls": True, "layer": 6},
    "prompts": ["a handwritten digit"],
    "references": {"source": "mnist", "split": "heldout", "count": 50, "seed": 0},
    "seeds": [0, 1, 2, 3, 4],
    "steps": 8,
    "cfg": 3.0,
    "image_guidance": None,  # None: the reference shares the text's guidance scale (plain guidance)
    "injection": {"blocks": "all", "mode": "joint"},
    "blend": {"mode": "interpolate", "alpha": 0.5},
    "adapters": {"projection": "checkpoints/toy-projection/final", "lora": "checkpoints/toy-lora/final",
                 "kv": "checkpoints/toy-kv/final"},
    "random_seed": 0,
    "arms": None,  # None: none, blend, zero-shot, every adapter, random
    "similarity_seeds": 1,  # DINOv2 similarity (the costly metric) on the first seed's samples
    "bootstrap": {"resamples": 1000, "seed": 0, "level": 0.95},
    "sweep": {"scales": [0.0, 0.5, 1.0, 2.0, 4.0], "arms": None, "seeds": [0], "references": 50},
    "conflict": {"prompt": "a handwritten digit", "scales": [0.0, 0.5, 1.0, 2.0, 4.0],
                 "image_guidance": [1.0, 3.0, 6.0, 12.0], "arms": None, "seeds": [0], "references": 50},
    "pairs": {"references": 20, "arms": None, "seeds": [0]},  # two references, left / right masks; arms null: the best
    "grid_references": 20,
    "out": "outputs/compare",
    "wandb": False,
}
KNOWN_KEYS = set(TOY_DEFAULT) | {"pipeline", "generate", "batch_size"}


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The toy defaults, updated by a YAML file (top-level keys replace the defaults') and by `overrides`."""
    cfg = copy.deepcopy(TOY_DEFAULT)
    if path:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise CompareError(f"config file {path} does not exist; see configs/toy/compare.yaml for the format.")
        given = yaml.safe_load(p.read_text()) or {}
        unknown = sorted(set(given) - KNOWN_KEYS)
        if unknown:
            raise CompareError(f"{path}: unknown keys {unknown}; known: {sorted(KNOWN_KEYS)}.")
        if given.get("world", "toy") != "toy":  # a real pipeline: toy paths do not apply
            cfg["dit"], cfg["adapters"], cfg["classifier"] = None, {}, None
            cfg["sweep"] = cfg["conflict"] = cfg["pairs"] = None  # they need labels
            cfg["similarity_seeds"] = None
        cfg.update(given)
    for k, v in (overrides or {}).items():
        if v is not None:
            cfg[k] = v
    if cfg.get("world") == "toy":
        cfg = locate_assets(cfg)
    return cfg


def locate_assets(cfg: dict[str, Any]) -> dict[str, Any]:
    """The toy world's relative asset paths (`dit`, `classifier`, `adapters`) found wherever the command runs:
    the current folder first (a user's own `checkpoints/...` wins), then the repository the package runs from
    (`vlhooks.assets.shipped`). A path found nowhere stays as given, for `check_config` to name."""
    from vlhooks.assets import shipped

    def find(path):
        if not isinstance(path, str) or not path:
            return path
        try:
            return str(shipped(path))
        except CompareError:
            return path

    cfg = dict(cfg)
    cfg["dit"], cfg["classifier"] = find(cfg.get("dit")), find(cfg.get("classifier"))
    if isinstance(cfg.get("adapters"), dict):
        cfg["adapters"] = {name: find(path) for name, path in cfg["adapters"].items()}
    return cfg


def _is_int(x: Any, least: float = -math.inf) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least


def _transformer_class(name: str, where: str) -> type:
    from vlhooks.models import family_for_class

    try:
        return family_for_class(name).transformer_class_named(name)
    except VLHooksError as e:
        raise CompareError(f"{where}: {e}") from e


def _meta_transformer(folder: Path) -> torch.nn.Module:
    """The transformer saved in `folder` (its class from `config.json`'s `_class_name`), built on the meta device."""
    cls = _transformer_class(json.loads((folder / "config.json").read_text()).get("_class_name", "?"), str(folder))
    with torch.device("meta"):
        return cls.from_config(cls.load_config(str(folder)))


def _check_sampling(cfg: dict[str, Any]) -> None:
    seeds, prompts = cfg.get("seeds"), cfg.get("prompts")
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise CompareError(f"seeds must be a non-empty list of integers (e.g. seeds: [0, 1, 2], or --seeds 0 1 2), "
                           f"got {seeds!r}.")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise CompareError(f"prompts must be a non-empty list of strings (e.g. prompts: [a handwritten digit]), "
                           f"got {prompts!r}.")
    steps = cfg.get("steps")
    if not _is_int(steps, 1):
        raise CompareError(f"steps must be an integer >= 1 (the denoising steps, e.g. steps: 25, or --steps 25), "
                           f"got {steps!r}.")
    scale = cfg.get("cfg")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise CompareError(f"cfg must be a number (the classifier-free guidance scale, e.g. cfg: 3.0; 1.0 for none), "
                           f"got {cfg.get('cfg')!r}.")
    ig = cfg.get("image_guidance")
    if ig is not None and (isinstance(ig, bool) or not isinstance(ig, (int, float)) or not math.isfinite(ig)):
        raise CompareError(f"image_guidance must be a number (the reference's own guidance scale, e.g. 6.0) or null "
                           f"(the same as cfg), got {ig!r}.")
    for study, lists in (("sweep", ("scales",)), ("conflict", ("scales", "image_guidance")), ("pairs", ())):
        spec = cfg.get(study)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise CompareError(f"{study} must be a mapping (see configs/toy/compare.yaml) or null, got {spec!r}.")
        for key in lists:
            v = spec.get(key, [1.0])
            if not isinstance(v, list) or not v or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v):
                raise CompareError(f"{study}.{key} must be a non-empty list of numbers >= 0, got {v!r}.")
        seeds = spec.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
            raise CompareError(f"{study}.seeds must be a non-empty list of integers, got {seeds!r}.")
        arms = spec.get("arms")
        if arms is not None and not (isinstance(arms, list) and all(isinstance(a, str) for a in arms)):
            raise CompareError(f"{study}.arms must be a list of arm names or null (zero-shot and the best adapter).")


def _check_world(cfg: dict[str, Any]) -> torch.nn.Module:
    """The world's own keys; returns its DiT on the meta device."""
    import inspect

    import diffusers

    if cfg["world"] == "toy":
        from .references import SOURCES, TRANSFORMS

        refs = cfg.get("references") or {}
        count = refs.get("count", 50)
        if not _is_int(count, 1):
            raise CompareError(f"references.count must be an integer >= 1 (or --references N), got {count!r}.")
        if refs.get("source", "mnist") not in SOURCES:
            raise CompareError(f"references.source must be one of {SOURCES}, got {refs.get('source')!r}.")
        if refs.get("transform", "none") not in TRANSFORMS:
            raise CompareError(f"references.transform must be one of {TRANSFORMS}, got {refs.get('transform')!r}.")
        dit_path = Path(cfg["dit"] or "")
        if not (dit_path / "config.json").is_file():
            raise CompareError(f"the toy DiT {dit_path} is missing; run from the repository root or set `dit`.")
        return _meta_transformer(dit_path)
    spec = cfg.get("pipeline") or {}
    if not spec.get("path"):
        raise CompareError("pipeline.path is required for world 'pipeline' (a diffusers pipeline folder or hub id).")
    folder = Path(spec["path"])  # a local folder names its own classes; a hub id is checked without downloading
    index = folder / "model_index.json"
    pipe_name = spec.get("class") or (json.loads(index.read_text()).get("_class_name") if index.is_file() else None)
    pipe_cls = getattr(diffusers, pipe_name or "", None)
    if pipe_cls is None:
        raise CompareError(f"pipeline.class {pipe_name!r} is not a diffusers pipeline class; name the pipeline's "
                           "class (the `_class_name` of its model_index.json).")
    bad = sorted(set(cfg.get("generate") or {}) - set(inspect.signature(pipe_cls.__call__).parameters))
    if bad:
        raise CompareError(f"generate keys {bad} are not arguments of {pipe_name}.__call__.")
    if not (cfg.get("references") or {}).get("folder"):
        raise CompareError("world 'pipeline' needs references.folder (a folder of images).")
    batch = cfg.get("batch_size", 1)
    if not _is_int(batch, 1):
        raise CompareError(f"batch_size must be an integer >= 1 (references per pipeline call), got {batch!r}.")
    if (folder / "transformer" / "config.json").is_file():  # a local folder: its own block count
        return _meta_transformer(folder / "transformer")
    if not spec.get("transformer_class"):
        raise CompareError("pipeline.transformer_class is required when pipeline.path is not a local folder (the "
                           "`_class_name` of the pipeline's transformer/config.json).")
    cls = _transformer_class(spec["transformer_class"], "pipeline.transformer_class")
    with torch.device("meta"):
        return cls()  # full-size defaults, no weights


def check_config(cfg: dict[str, Any], check_files: bool = False) -> list[Arm]:
    """Everything that can be checked without weights, in one go: the world, seeds, prompts, steps and guidance,
    the arms (with `check_files`, that adapter folders hold an adapter), the blend mode, the injection config and
    its blocks against the DiT's (built on the meta device), and (pipeline world) every `generate` key against the
    pipeline's `__call__`. Returns the arms; raises `CompareError` naming the fix."""
    import vlhooks as vh
    from vlhooks.blending import BLEND_MODES

    if cfg.get("world") not in ("toy", "pipeline"):
        raise CompareError(f"world must be 'toy' or 'pipeline', got {cfg.get('world')!r}.")
    _check_sampling(cfg)
    arms = plan_arms(cfg, check_files=check_files)
    blend = cfg.get("blend") or {}
    if blend.get("mode") not in BLEND_MODES:
        raise CompareError(f"blend.mode {blend.get('mode')!r} is not one of {BLEND_MODES}.")
    dit = _check_world(cfg)
    try:
        config = vh.InjectionConfig.from_dict(cfg["injection"])
        config.validate()
        vh.family_for(dit).select(dit, config.blocks)
    except VLHooksError as e:
        raise CompareError(f"injection: {e}") from e
    return arms
