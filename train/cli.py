"""`vlhooks train`: `LightningCLI` over `AdapterModule` + `PairsDataModule` with YAML recipes.

    vlhooks train --config configs/z_image/projection.yaml --trainer.max_steps 200
    vlhooks train --config configs/z_image/projection.yaml --ckpt_path last      # resume

The run's adapter folders go to `<checkpoint_root>/<run_name>/step-N/` and `final/`; the resumable Lightning
state to `<checkpoint_root>/<run_name>/lightning/last.ckpt` (a safetensors file, no pickle); fixed-seed samples to
`<checkpoint_root>/<run_name>/samples/step-N.png`; logs to
`<checkpoint_root>/<run_name>/logs/` (CSV, and wandb offline unless logged in).

Several GPUs: `--trainer.strategy ddp --trainer.devices N` (Lightning starts the processes; each rank trains on
its own shard of the data, through Lightning's distributed sampler, with its own noise). `--trainer.strategy fsdp`
shards the frozen DiT: the run uses Lightning's FSDP strategy with a wrap policy for the recipe's DiT (see
`fsdp_units`; the adapter stays in the root unit) and the safetensors checkpoint reader
(`SafetensorsFSDPStrategy`). In every multi-process run every rank runs the same graph each step (a row whose image
is dropped still computes the extras, at strength 0), since each FSDP unit's gather is a collective. Verified on
2 CPU processes (gloo, `tests/test_distributed.py`: identical adapters on both ranks, an untouched DiT, a loadable
export, an exact resume); not yet run on several GPUs (no 2-GPU machine was available).
Only global rank 0 writes checkpoints, adapter folders, samples and logs.

Nothing a user has is lost or replaced unless told to: a run folder that holds a previous run's outputs
(`final/`, `step-N/`, `lightning/*.ckpt`) is refused without `--ckpt_path` (resume it with `--ckpt_path last`,
train under another `--model.run_name`, or replace it with `--overwrite`). One process trains a run folder at a
time (a lock on the folder); on start and on resume it removes what a killed writer of its own left there
(temporary adapter folders and checkpoint files, by the names vlhooks' writers give them). `--ckpt_path` takes
`last` (the run's `lightning/last.ckpt`) or a checkpoint's path, read through the safetensors reader; a missing,
truncated or foreign one, or one of another adapter, is an error naming the fix. Bad options and data print one
`vlhooks train: error: ...` line (exit code 2).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy

from vlhooks.errors import TrainingError, VLHooksError

from .callbacks import AdapterExport, StepProgressBar, default_loggers
from .checkpoint_io import (SafetensorsCheckpointIO, SafetensorsFSDPStrategy, check_run_dir, checkpoint_metadata,
                            lock_run_dir, remove_stale_temporaries, replace_run)
from .data import PairsDataModule
from .module import AdapterModule
from .sampling import SampleImages


def fsdp_units(module: AdapterModule) -> list[torch.nn.Module]:
    """The DiT's modules that `fsdp` makes FSDP units: the family's answer (`DiTFamily.fsdp_units`: the DiT itself,
    and in every block the children that run only inside the block's forward), except in the blocks the extras'
    embedding runs (`_embedding_blocks`: Z-Image's context refiner), which stay in the DiT's unit.

    Every rank must gather the same units the same number of times per step (each gather is a collective): in
    a multi-process run the injection keeps every row in the extras path (`Injector.same_graph`, set by
    `AdapterModule.on_fit_start`), so the extras' embedding and the backward through the blocks happen on every
    rank, also when all of a rank's rows dropped the image. A unit's weights exist only while its own forward
    runs, and once per forward: the injection code runs a block's norms and modulation on the injected tokens
    outside that block's forward, and the embedding runs its blocks on the features before the DiT runs them on
    the caption, so those stay in the DiT's unit, gathered once per DiT forward. (A unit run twice per forward,
    first with gradients (the embedding, under a projection adapter) then without (the caption), is not
    gathered again in backward: torch's FSDP re-gathers a unit in backward only if its last forward's outputs
    needed gradients.) The attention's unit holds its K/V linears, which the adapters (LoRA through them) call
    inside the attention's forward. The adapter is in no unit of its own: it stays in the root unit (FSDP
    flattens a unit into one tensor of one dtype, so a bf16 DiT and an fp32 adapter cannot share one; the
    all-frozen DiT units get no gradient buffers)."""
    return module.family.fsdp_units(module.dit, skip=_embedding_blocks(module))


def _embedding_blocks(module: AdapterModule) -> set[int]:
    """`id`s of the site blocks that the family's `embed` runs on the features (Z-Image: its context refiner; Flux
    and SD3: none), found by embedding one zero token per embedding of the sites, without gradients."""
    dit, fam = module.dit, module.family
    sites = fam.sites(dit)
    seen: set[int] = set()
    hooks = [site.block(dit).register_forward_pre_hook(lambda m, args: seen.add(id(m))) for site in sites]
    p = next(dit.parameters())
    tokens = torch.zeros(1, 1, fam.caption_width(dit), dtype=p.dtype, device=p.device)
    try:
        with torch.no_grad():
            for site in {fam.embed_key(s): s for s in sites}.values():
                fam.embed(dit, tokens, None, site, {})
    finally:
        for h in hooks:
            h.remove()
    return seen


def launched_rank() -> int:
    """The rank Lightning's launcher (or torchrun) gave this process; 0 in the process a user started."""
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(key)
        if value and value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def check_trainer_options(cfg) -> None:
    """`TrainingError` for trainer options Lightning would refuse with a traceback."""
    steps = cfg.get("max_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < -1):
        raise TrainingError(f"--trainer.max_steps must be the number of steps to train (0 or more; -1 trains until "
                            f"--trainer.max_epochs), got {steps!r}.")
    epochs = cfg.get("max_epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < -1):
        raise TrainingError(f"--trainer.max_epochs must be 0 or more (-1: no limit), got {epochs!r}.")
    acc = cfg.get("accumulate_grad_batches")
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, int) or acc < 1):
        raise TrainingError(f"--trainer.accumulate_grad_batches must be a positive integer, got {acc!r}.")


def prepare_run_dir(run_dir: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """In the process the user started (not in the ranks Lightning launches): refuse what would replace a previous
    run (`check_run_dir`), then lock the run folder, remove what a killed writer of it left, and with `overwrite`
    remove the previous run's outputs."""
    if launched_rank() != 0:
        return
    outputs = check_run_dir(run_dir, ckpt_path, overwrite)
    lock_run_dir(run_dir)
    removed = remove_stale_temporaries(run_dir)
    try:
        from vlhooks.adapters.base import clean_temporaries
    except ImportError:
        clean_temporaries = None
    if clean_temporaries is not None:
        removed += [str(p) for p in clean_temporaries(run_dir)]
    if removed:
        print(f"vlhooks: removed {len(removed)} temporary file(s) an interrupted run left in {run_dir}: "
              f"{', '.join(sorted(removed)[:4])}", file=sys.stderr)
    if outputs:
        replace_run(run_dir, outputs)
        print(f"vlhooks: --overwrite: removed the previous run's {', '.join(outputs[:4])} from {run_dir}",
              file=sys.stderr)


def check_resume(module: AdapterModule, run_dir: Path, ckpt_path: str | None) -> None:
    """Before anything is written: the checkpoint a run resumes from must hold this run's adapter (its type, and
    the names and shapes of its weights), else a `CheckpointError` naming the fix (Lightning would fail later, on
    the optimizer's parameter groups, after writing the run's config)."""
    if ckpt_path is None:
        return
    path = run_dir / "lightning" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    structure = checkpoint_metadata(path)
    module._check_resumable(_header_view(path, structure), where=path)


def _header_view(path: Path, structure: dict) -> dict:
    """The checkpoint's hyper-parameters, and its `state_dict` as shape-only stand-ins (no tensor is read)."""
    from safetensors import safe_open

    def find(items, key):
        return next((v for k, v in items if k == key), None)

    top = structure.get("__dict__", []) if isinstance(structure, dict) else []
    hparams = _plain(find(top, "hyper_parameters"))
    state = find(top, "state_dict") or {}
    shapes = {}
    with safe_open(str(path), framework="pt") as f:
        for k, ref in state.get("__dict__", []):
            if isinstance(ref, dict) and "__tensor__" in ref:
                shapes[k] = torch.empty(f.get_slice(ref["__tensor__"]).get_shape(), device="meta")
    return {"hyper_parameters": hparams, "state_dict": shapes}


def _plain(obj):
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        if "__dict__" in obj:
            return {k: _plain(v) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_plain(v) for v in obj["__tuple__"])
        return None if "__tensor__" in obj else obj
    return obj


class VLHooksCLI(LightningCLI):
    def __init__(self, *args, overwrite: bool = False, **kwargs):
        self.overwrite = overwrite
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Lightning's reads a `--ckpt_path` file's hyper-parameters with torch's pickle loader (which cannot read a
        safetensors checkpoint) and lets them replace the recipe's. Here the file is only checked (a
        `CheckpointError` for a missing, truncated or foreign one): the recipe and the command line define the
        run, as with `--ckpt_path last`, and the module refuses a checkpoint of another adapter."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            checkpoint_metadata(ckpt_path)

    def instantiate_trainer(self, **kwargs):
        h = self.model.hparams
        run_dir = Path(h.checkpoint_root) / h.run_name
        cfg = self._get(self.config_init, "trainer", default={})
        check_trainer_options(cfg)
        ckpt_path = self._get(self.config_init, "ckpt_path")
        if ckpt_path in ("best", "hpc", "registry"):
            raise TrainingError(f"--ckpt_path {ckpt_path} is not supported by vlhooks train; use last or a path.")
        if launched_rank() == 0:
            check_run_dir(run_dir, ckpt_path, self.overwrite)  # (again in prepare_run_dir, which then writes)
            check_resume(self.model, run_dir, ckpt_path)
        prepare_run_dir(run_dir, ckpt_path, self.overwrite)
        extra = {}
        if cfg.get("logger") in (None, True):
            extra["logger"] = default_loggers(run_dir)
        plugins = list(cfg.get("plugins") or [])
        if not any(isinstance(p, SafetensorsCheckpointIO) for p in plugins):
            plugins.append(SafetensorsCheckpointIO())
        extra["plugins"] = plugins
        strategy = cfg.get("strategy")
        if isinstance(strategy, str) and strategy in ("fsdp", "fsdp_cpu_offload"):
            extra["strategy"] = SafetensorsFSDPStrategy(cpu_offload=strategy == "fsdp_cpu_offload")
        extra.setdefault("default_root_dir", str(run_dir))
        every = int(h.save_every_n_steps) or None
        extra["callbacks"] = list(cfg.get("callbacks") or []) + [
            # no `last-v1.ckpt`: a new run never starts over a checkpoint (`check_run_dir`), so `last.ckpt` is
            # always this run's, replaced atomically (also when the run folder was moved between resumes)
            ModelCheckpoint(dirpath=str(run_dir / "lightning"), filename="step-{step}", save_last=True,
                            save_top_k=0, every_n_train_steps=every, enable_version_counter=False),
            AdapterExport(run_dir, every_n_steps=int(h.save_every_n_steps)),
        ]
        if int(h.sample_count):  # 0: no samples
            extra["callbacks"].append(SampleImages(run_dir, every_n_steps=int(h.sample_every_n_steps),
                                                   count=int(h.sample_count)))
        if cfg.get("enable_progress_bar", True) is not False:
            extra["callbacks"].append(StepProgressBar())
        trainer = super().instantiate_trainer(**extra, **kwargs)
        if isinstance(trainer.strategy, FSDPStrategy) and "auto_wrap_policy" not in trainer.strategy.kwargs:
            from torch.distributed.fsdp.wrap import CustomPolicy

            units = {id(m) for m in fsdp_units(self.model)}
            trainer.strategy.kwargs["auto_wrap_policy"] = CustomPolicy(lambda m: id(m) in units)
        return trainer


def pop_flag(argv: list[str], flag: str) -> tuple[list[str], bool]:
    """`argv` without `flag` (also `flag=true|false`), and whether it was set. Kept off the parser, so it never
    lands in the saved config.yaml (a rerun from that file must not replace a run)."""
    out, value = [], False
    for a in argv:
        if a == flag:
            value = True
        elif a.startswith(flag + "="):
            v = a.split("=", 1)[1].lower()
            if v not in ("true", "false", "1", "0", "yes", "no"):
                raise TrainingError(f"{flag} takes no value (or true / false), got {a!r}.")
            value = v in ("true", "1", "yes")
        else:
            out.append(a)
    return out, value


def run_cli(prog: str, make, argv: list[str]) -> int:
    """Run a `LightningCLI` (`make(argv, overwrite)`): a `VLHooksError` (bad option, data, checkpoint, run folder)
    prints one `<prog>: error: ...` line and returns 2."""
    try:
        argv, overwrite = pop_flag(argv, "--overwrite")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            # the frozen DiT is in eval mode on purpose; the rest is Lightning's own internals
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            make(argv, overwrite)
    except VLHooksError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


HELP = """usage: vlhooks train --config RECIPE [--section.option VALUE ...] [--ckpt_path last|PATH] [--overwrite]

Fit an adapter on a frozen DiT (a LightningCLI over vlhooks.train.AdapterModule and PairsDataModule).

recipes (configs/):
{recipes}

often used:
  --config RECIPE                  a YAML recipe (above)
  --trainer.max_steps N            optimizer steps
  --trainer.accelerator cpu|gpu    --trainer.devices N   --trainer.strategy ddp|fsdp
  --trainer.precision bf16-mixed   (or 32-true, bf16-true)
  --model.run_name NAME            outputs go to <checkpoint_root>/<run_name>/ (final/, step-N/, lightning/last.ckpt)
  --model.checkpoint_root DIR      (default: checkpoints)
  --model.adapter "{{type: projection, kind: mlp}}"   projection | kv | lora, and the type's options
  --model.lr LR                    --model.save_every_n_steps N   --model.sample_every_n_steps N
  --data.source skimage|mnist|folder|dataset   --data.batch_size N
  --ckpt_path last|PATH            resume a run (the same weights as an uninterrupted run)
  --overwrite                      replace a finished run of the same name (otherwise refused)

vlhooks train --help-all lists every option of the recipe's sections."""


def _recipes() -> str:
    root = Path(__file__).resolve().parent.parent / "configs"
    found = sorted(str(p.relative_to(root.parent)) for p in root.glob("*/*.yaml")
                   if p.name not in ("compare.yaml", "pretrain.yaml"))
    return "\n".join(f"  {r}" for r in found) or "  (none found next to the package)"


def main(argv: list[str] | None = None) -> int:
    """`vlhooks train [--overwrite] --config RECIPE [--section.option VALUE ...] [--ckpt_path last|PATH]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(HELP.format(recipes=_recipes()))
        return 0
    argv = ["--help" if a == "--help-all" else a for a in argv]

    def make(args, overwrite):
        cli = VLHooksCLI(AdapterModule, PairsDataModule, args=["fit", *args], overwrite=overwrite,
                         save_config_kwargs={"overwrite": True}, trainer_defaults={"enable_checkpointing": True},
                         seed_everything_default=0, parser_kwargs={"fit": {"prog": "vlhooks train"}})
        cli.model.release()

    return run_cli("vlhooks train", make, argv)
