"""Callbacks of `vlhooks train`: adapter-only checkpoints, and loggers that never crash a run."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


class AdapterExport(L.Callback):
    """Write `<root>/<run>/step-N/` every `every_n_steps` (0: never) and `<root>/<run>/final/` at the end, each an
    adapter folder (`adapter_config.json` + `adapter_model.safetensors`) written atomically. Every rank calls
    `export_adapter` (under FSDP it gathers the adapter's shards first); only global rank 0 writes.

    `final/` is written when the last step (`max_steps`) ends, before Lightning's checkpoint callback writes that
    step's checkpoint (it runs the checkpoint callbacks last): a run killed in between resumes from an earlier
    checkpoint and writes it again, and a resumed run whose checkpoint is already at `max_steps` (Lightning then
    runs no training loop, so no `on_train_end`) still has it. A run that stops otherwise (`max_epochs`, a
    callback) writes it in `on_train_end`; one that had nothing left to train, in `on_fit_end`."""

    def __init__(self, run_dir: str | os.PathLike, every_n_steps: int = 0):
        self.run_dir = Path(run_dir)
        self.every_n_steps = int(every_n_steps)
        self._final_at: int | None = None  # the global step `final/` was written at, in this process

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            pl_module.export_adapter(self.run_dir / f"step-{step}")
        if trainer.max_steps is not None and 0 < trainer.max_steps <= step:
            self._final(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._final(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._final_at is None:
            self._final(trainer, pl_module)

    def _final(self, trainer, pl_module) -> None:
        if self._final_at != trainer.global_step:
            pl_module.export_adapter(self.run_dir / "final")
            self._final_at = trainer.global_step


def default_loggers(run_dir: str | os.PathLike) -> list:
    """A CSV logger always; wandb too when it imports (offline unless the user has logged in)."""
    from lightning.pytorch.loggers import CSVLogger

    run_dir = Path(run_dir)
    loggers = [CSVLogger(save_dir=str(run_dir), name="logs")]
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        warnings.warn("wandb is not importable: logging to CSV only (pip install wandb to add it).", stacklevel=2)
        return loggers
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    mode = os.environ.get("WANDB_MODE") or ("online" if logged_in else "offline")
    try:
        loggers.append(WandbLogger(project="vlhooks", name=run_dir.name, save_dir=str(run_dir), mode=mode))
    except Exception as e:  # a broken wandb install must not stop training
        warnings.warn(f"wandb logger unavailable ({e}); logging to CSV only.", stacklevel=2)
    return loggers


class StepProgressBar(ProgressBar):
    """One bar over the run's optimizer steps, with the real total (`max_steps`, or the epochs' steps) and
    starting where a resumed run stands; the loss shown at most twice a second (each read syncs with the device)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled, self._bar, self._shown = True, None, 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        from tqdm.auto import tqdm

        total = trainer.max_steps
        if total is None or total < 0:
            per_epoch = -(-trainer.num_training_batches // max(1, trainer.accumulate_grad_batches))
            total = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self._bar = tqdm(total=total, initial=trainer.global_step, desc="train", unit="step", dynamic_ncols=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is None:
            return
        self._bar.update(trainer.global_step - self._bar.n)
        now = time.monotonic()
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and now - self._shown > 0.5:
            self._bar.set_postfix(loss=f"{float(loss):.4f}")
            self._shown = now

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)
