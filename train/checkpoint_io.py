"""`SafetensorsCheckpointIO`: Lightning's resume checkpoints without pickle.

A Lightning checkpoint is a nested dict of tensors and plain values. This writes it as ONE safetensors file: the
tensors as entries, the structure and every other value as JSON in the header's metadata. Written to a temporary
file and renamed, so a crash never leaves a half-written checkpoint. Values that JSON cannot hold raise a clear
error instead of being pickled. Under `fsdp` the checkpoint holds full (gathered) tensors, written by rank 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from safetensors.torch import load_file, safe_open, save_file

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


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path} is not a vlhooks training checkpoint (no {_META_KEY} metadata).")
    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    tensors = load_file(str(path), device=str(device))
    return _unflatten(json.loads(meta[_META_KEY]), tensors)


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
        _load_raw_module_state(checkpoint.pop("state_dict"), module=self.model, world_size=self.world_size,
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
