"""`vlhooks train`: `LightningCLI` over `AdapterModule` + `PairsDataModule` with YAML recipes.

    vlhooks train --config configs/z_image/projection.yaml --trainer.max_steps 200
    vlhooks train --config configs/z_image/projection.yaml --ckpt_path last      # resume

The run's adapter folders go to `<checkpoint_root>/<run_name>/step-N/` and `final/`; the resumable Lightning
state to `<checkpoint_root>/<run_name>/lightning/last.ckpt` (a safetensors file, no pickle); fixed-seed samples to
`<checkpoint_root>/<run_name>/samples/step-N.png`; logs to
`<checkpoint_root>/<run_name>/logs/` (CSV, and wandb offline unless logged in).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .callbacks import AdapterExport, default_loggers
from .checkpoint_io import SafetensorsCheckpointIO
from .data import PairsDataModule
from .module import AdapterModule
from .sampling import SampleImages


class VLHooksCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs):
        h = self.model.hparams
        run_dir = Path(h.checkpoint_root) / h.run_name
        cfg = self._get(self.config_init, "trainer", default={})
        extra = {}
        if cfg.get("logger") in (None, True):
            extra["logger"] = default_loggers(run_dir)
        plugins = list(cfg.get("plugins") or [])
        if not any(isinstance(p, SafetensorsCheckpointIO) for p in plugins):
            plugins.append(SafetensorsCheckpointIO())
        extra["plugins"] = plugins
        extra.setdefault("default_root_dir", str(run_dir))
        every = int(h.save_every_n_steps) or None
        extra["callbacks"] = list(cfg.get("callbacks") or []) + [
            ModelCheckpoint(dirpath=str(run_dir / "lightning"), filename="step-{step}", save_last=True,
                            save_top_k=0, every_n_train_steps=every),
            AdapterExport(run_dir, every_n_steps=int(h.save_every_n_steps)),
            SampleImages(run_dir, every_n_steps=int(h.sample_every_n_steps), count=int(h.sample_count)),
        ]
        return super().instantiate_trainer(**extra, **kwargs)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = VLHooksCLI(AdapterModule, PairsDataModule, args=["fit", *argv], save_config_kwargs={"overwrite": True},
                     trainer_defaults={"enable_checkpointing": True}, seed_everything_default=0)
    cli.model.release()
    return 0
