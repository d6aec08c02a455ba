"""`SafetensorsCheckpointIO`: Lightning's resume checkpoints without pickle, and the run folder's safety.

A Lightning checkpoint is a nested dict of tensors and plain values. This writes it as ONE safetensors file: the
tensors as entries, the structure and every other value as JSON in the header's metadata. Written to a temporary
file and renamed, so a crash never leaves a half-written checkpoint. Values that JSON cannot hold raise a clear
error instead of being pickled. Under `fsdp` the checkpoint holds full (gathered) tensors, written by rank 0.
A missing, truncated or foreign file is a `CheckpointError` naming it and the fix.

Exact resumes: `canonical_progress` rewrites the loop counters a checkpoint stores as a function of its global
step (Lightning's own, after a resume from a checkpoint written at an epoch's last batch, fall one epoch behind
per resume). The run folder: `check_run_dir` refuses to train over a previous run's outputs unless told to,
`lock_run_dir` keeps two processes from training one run at once, and `remove_stale_temporaries` removes what a
killed writer left (only names vlhooks' own writers use).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from safetensors.torch import load_file, safe_open, save_file

from vlhooks.errors import CheckpointError, TrainingError

_META_KEY = "vlhooks.lightning"


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"checkpoint dict at {path!r} has non-str/int keys; cannot store it without pickle.")
        return {"__dict__": [[k, _flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"checkpoint value at {path!r} is a {type(obj).__name__}; vlhooks stores checkpoints without "
                    "pickle, so keep only tensors and plain values (numbers, strings, lists, dicts) there.")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
    return obj


def save_checkpoint_file(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(checkpoint, tensors, "checkpoint")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(structure)})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The structure a vlhooks training checkpoint stores in its header (cheap: no tensor is read). A missing,
    truncated or foreign file is a `CheckpointError` naming it and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass --ckpt_path last to resume the run's own "
                              "lightning/last.ckpt, or the path of an existing .ckpt file.")
    with open(path, "rb") as fh:
        head = fh.read(8)
    pickled = CheckpointError(f"{path} is a PyTorch (pickle) checkpoint, not a vlhooks one: vlhooks reads only its "
                              "own safetensors checkpoints (no pickle, nothing to execute); resume from the "
                              "lightning/last.ckpt that `vlhooks train` wrote.")
    if head[:4] == b"PK\x03\x04":  # torch.save's zip format
        raise pickled
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # SafetensorError: a truncated or non-safetensors file
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # a bare pickle
            raise pickled from None
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({e}); it cannot be resumed: pass "
                              "another checkpoint with --ckpt_path, or start the run again with --overwrite "
                              "(or another --model.run_name).") from None
    if _META_KEY not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a vlhooks training checkpoint (no {_META_KEY} "
                              "metadata; an adapter's weights?); resume from the lightning/last.ckpt that "
                              "`vlhooks train` wrote.")
    try:
        return json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its {_META_KEY} metadata is not valid JSON ({e}); the file is damaged, pass "
                              "another checkpoint with --ckpt_path.") from None


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    structure = checkpoint_metadata(path)
    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        tensors = load_file(str(path), device=str(device))
        return _unflatten(structure, tensors)
    except KeyError as e:
        raise CheckpointError(f"{path} is damaged: its structure names tensor {e} that it does not hold; pass "
                              "another checkpoint with --ckpt_path.") from None
    except Exception as e:  # SafetensorError while reading the tensors
        raise CheckpointError(f"{path} cannot be read ({e}); pass another checkpoint with --ckpt_path.") from None


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning `CheckpointIO` writing pickle-free single-file checkpoints."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location)

    def remove_checkpoint(self, path) -> None:
        if os.path.exists(path):
            os.remove(path)


class SafetensorsFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy`, unchanged except that a full (single-file) checkpoint is read through the
    strategy's `CheckpointIO`: Lightning's own FSDP reader opens the file with torch's pickle loader, which cannot
    read `SafetensorsCheckpointIO`'s files. Model and optimizer states are then loaded exactly as Lightning does
    (full state dicts, re-keyed and scattered by torch's FSDP). When saving, the model's state dict is left to the
    module (see `lightning_module_state_dict`). `vlhooks train` substitutes it for `fsdp`."""

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Empty for `AdapterModule`: its checkpoints hold the adapter only, which its `on_save_checkpoint` writes
        into `state_dict` (gathered through `full_adapter`). Lightning's own gathers every FSDP unit, the whole
        frozen DiT, to rank 0 at every save, for the module to discard it."""
        if hasattr(self.lightning_module, "full_adapter"):
            return {}
        return super().lightning_module_state_dict()

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if self._state_dict_type != "full" or not path.is_file():
            return super().load_checkpoint(checkpoint_path, weights_only)
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        checkpoint = self.checkpoint_io.load_checkpoint(path)
        state = checkpoint.pop("state_dict")
        adapter = getattr(self.lightning_module, "adapter", None)
        if hasattr(adapter, "module_state"):
            # the checkpoint holds the adapter under its saved names (`trainable_state_dict`); the module's
            # `on_load_checkpoint` renames them to the module's own, but Lightning calls it after this load
            saved = {k.removeprefix("adapter."): v for k, v in state.items() if k.startswith("adapter.")}
            state = {**{k: v for k, v in state.items() if not k.startswith("adapter.")},
                     **{f"adapter.{k}": v for k, v in adapter.module_state(saved).items()}}
        _load_raw_module_state(state, module=self.model, world_size=self.world_size,
                               strict=self.lightning_module.strict_loading)
        states = checkpoint.get("optimizer_states")
        if states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(self.optimizers) != len(states):
            raise RuntimeError(f"{len(self.optimizers)} optimizers configured but the checkpoint has {len(states)}.")
        with _get_full_state_dict_context(self.model, world_size=self.world_size, rank0_only=False):
            for optimizer, state in zip(self.optimizers, states):
                if state["state"] and isinstance(next(iter(state["state"])), int):
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, state))
        return checkpoint


# ------------------------------------------------------------------------------------------------ exact resumes
def canonical_progress(checkpoint: dict[str, Any], batches_per_epoch: int, accumulate: int = 1) -> bool:
    """Rewrite the fit loop's epoch and batch counters in `checkpoint` to what an uninterrupted run has at its
    global step, and return whether it did.

    Why: after a resume from a checkpoint written at an epoch's last batch, Lightning closes that epoch (counts it
    processed and completed) but never counts the next one as started, so its counters are one epoch behind from
    then on; a second resume from such a run's checkpoint fits none of Lightning's restart cases and repeats an
    epoch (the saved `epoch` falls one further behind per resume). Written as a function of the global step, every
    checkpoint is one of the two states an uninterrupted run saves: mid-epoch after a batch (Lightning's standard
    mid-epoch restart), or between epochs (the next epoch then starts afresh, its hooks called). A checkpoint
    written at a batch's end, an epoch's end or the end of training (Lightning's `save_last` writes one there, also
    when `max_steps` stops a run mid-epoch, whose epoch Lightning then counts as complete) is rewritten; any other
    shape (written mid-step) is left as Lightning wrote it. `batches_per_epoch` is per process, after
    `limit_train_batches`."""
    try:
        fit = checkpoint["loops"]["fit_loop"]
        ep, bp = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
        et, bt = ep["total"], bp["total"]
        stepped = fit["epoch_loop.state_dict"]
        step = int(checkpoint["global_step"])
    except (KeyError, TypeError, ValueError):
        return False
    if not isinstance(batches_per_epoch, int) or batches_per_epoch <= 0:
        return False
    # written after a batch's steps (at its end, or later: an epoch's end, the end of training), never mid-step
    batch_done = bt["ready"] == bt["started"] == bt["processed"] and bt["completed"] in (bt["processed"],
                                                                                          bt["processed"] - 1)
    epoch_known = et["ready"] == et["started"] and et["processed"] in (et["started"], et["started"] - 1) and \
        et["completed"] in (et["processed"], et["processed"] - 1)
    if not (batch_done and epoch_known):
        return False
    accumulate = max(1, int(accumulate))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accumulate))
    epoch, k = divmod(step, steps_per_epoch)
    within = k * accumulate
    done = epoch * batches_per_epoch + within

    def counts(ready, completed, started=None, processed=None):
        out = {"ready": ready, "completed": completed}
        if started is not None:
            out.update(started=started, processed=processed)
        return out

    if k == 0:  # between epochs: `epoch` epochs done, the next not started
        ep["total"], ep["current"] = counts(epoch, epoch, epoch, epoch), counts(epoch, epoch, epoch, epoch)
        bp["total"], bp["current"] = counts(done, done, done, done), counts(0, 0, 0, 0)
        stepped["_batches_that_stepped"] = step
    else:  # after batch `within` of epoch `epoch`, as an uninterrupted run saves at a batch's end
        ep["total"] = counts(epoch + 1, epoch, epoch + 1, epoch)
        ep["current"] = dict(ep["total"])
        bp["total"], bp["current"] = counts(done, done - 1, done, done), counts(within, within - 1, within, within)
        stepped["_batches_that_stepped"] = step - 1
    bp["is_last_batch"] = False
    checkpoint["epoch"] = epoch
    return True


def saved_at_batch_end(trainer) -> bool:
    """True while Lightning runs the callbacks' `on_train_batch_end` (a checkpoint or export written there comes
    before the module's own `on_train_batch_end`, which Lightning calls after the callbacks')."""
    try:
        bt = trainer.fit_loop.epoch_loop.batch_progress.total
    except AttributeError:
        return False
    return bool(trainer.training) and bt.ready == bt.started == bt.processed == bt.completed + 1


# ------------------------------------------------------------------------------------------------ the run folder
# What vlhooks' writers leave behind when killed mid-write, and nothing else: an adapter folder's temporary or
# replaced copy (`Adapter.save`: `.<name>.<mkdtemp suffix>/`, `.<name>.old-<pid>/`, for `final` and `step-N`,
# also pretraining's `.final.<suffix>/`), and a checkpoint's temporary file (`.<name>.ckpt.tmp-<pid>`).
_STALE_DIR = re.compile(r"^\.(final|step-\d+)\.[A-Za-z0-9_-]+$")
_STALE_CKPT = re.compile(r"^\.[^/]+\.ckpt\.tmp-\d+$")
_LOCKS: dict[str, int] = {}  # run folder -> open descriptor holding its lock, for the life of the process


def run_outputs(run_dir: str | os.PathLike) -> list[str]:
    """What a previous run left in `run_dir` that a new run would replace: `final/`, `step-N/`, checkpoints."""
    run_dir = Path(run_dir)
    found = [p.name + "/" for p in (run_dir / "final", *sorted(run_dir.glob("step-*"))) if p.is_dir()]
    found += [f"lightning/{p.name}" for p in sorted((run_dir / "lightning").glob("*.ckpt")) if p.is_file()]
    return found


def _writable_folder(path: Path, option: str) -> None:
    """`path` is, or can be made, a folder this process can write."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        raise TrainingError(f"{option} {str(path)!r} is under {str(p)!r}, which is a file, not a folder; set "
                            f"{option} to a folder.")
    if not os.access(p, os.W_OK | os.X_OK):
        raise TrainingError(f"{option} {str(path)!r}: {str(p)!r} is not writable by this user; set {option} to a "
                            "folder you can write.")


def check_run_dir(run_dir: str | os.PathLike, ckpt_path: str | None, overwrite: bool = False,
                  option: str = "--model.checkpoint_root") -> list[str]:
    """Before anything is written: what the run may do to `run_dir`, as an error naming the fix, or the previous
    outputs that `overwrite` will replace (an empty list otherwise).

    - the checkpoint root must be (or become) a writable folder;
    - without `ckpt_path`, a folder holding a previous run's outputs is refused (a new run would replace its
      `final/` and leave its checkpoint beside the new one) unless `overwrite`;
    - `ckpt_path="last"` needs the run's `lightning/last.ckpt`; an explicit path must be a vlhooks checkpoint,
      and one from elsewhere may not continue into a folder holding another run's outputs."""
    run_dir = Path(run_dir)
    _writable_folder(run_dir.parent, option)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"the run folder {str(run_dir)!r} is a file; set another --model.run_name or {option}.")
    outputs = run_outputs(run_dir)
    if ckpt_path is not None and overwrite:
        raise TrainingError("--overwrite replaces a run, --ckpt_path resumes one; pass only one of them.")
    if ckpt_path is None:
        if outputs and not overwrite:
            raise TrainingError(
                f"{run_dir} already holds a run ({', '.join(outputs[:4])}{', ...' if len(outputs) > 4 else ''}); "
                "resume it with --ckpt_path last, train under another --model.run_name, or pass --overwrite to "
                "replace it.")
        return outputs if overwrite else []
    if ckpt_path == "last":
        last = run_dir / "lightning" / "last.ckpt"
        if not last.is_file():
            raise CheckpointError(f"--ckpt_path last: no checkpoint at {last} (the run's lightning/last.ckpt); "
                                  "drop --ckpt_path to start the run, or check --model.run_name and "
                                  f"{option}.")
        checkpoint_metadata(last)
        return []
    checkpoint_metadata(ckpt_path)
    own = Path(ckpt_path).resolve().parent == (run_dir / "lightning").resolve()
    if outputs and not own:
        raise TrainingError(
            f"{run_dir} already holds a run ({', '.join(outputs[:4])}) and --ckpt_path {ckpt_path} is not one of its "
            "checkpoints: continuing it here would replace that run's outputs; use another --model.run_name, or "
            "--ckpt_path last to resume the run that is there.")
    return []


def lock_run_dir(run_dir: str | os.PathLike) -> None:
    """Hold an exclusive lock on the run folder for the rest of the process (the kernel drops it when the process
    ends, however it ends), so two processes never train, write or clean one run at once."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _LOCKS:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError as e:
        raise TrainingError(f"cannot create the run folder {run_dir} ({e.strerror}); set --model.checkpoint_root "
                            "to a folder you can write.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TrainingError(f"another process is training {run_dir} (it holds the folder's lock); wait for it to "
                            "end, or train under another --model.run_name.") from None
    _LOCKS[key] = fd


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[str]:
    """Remove what a killed writer of this run left (see `_STALE_DIR`, `_STALE_CKPT`; nothing else is touched).
    Call it holding the run's lock (`lock_run_dir`), so no live writer of the run can own them. Returns their
    names."""
    run_dir = Path(run_dir)
    removed = []
    for folder, pattern, is_dir in ((run_dir, _STALE_DIR, True), (run_dir / "lightning", _STALE_CKPT, False)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if not pattern.match(p.name) or p.is_symlink() or p.is_dir() != is_dir:
                continue
            if is_dir:
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(str(p.relative_to(run_dir)))
    return removed


def replace_run(run_dir: str | os.PathLike, outputs: list[str]) -> None:
    """`--overwrite`: remove the previous run's outputs (as listed by `run_outputs`) and its samples."""
    run_dir = Path(run_dir)
    for name in [*outputs, "samples/"]:
        p = run_dir / name.rstrip("/")
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
