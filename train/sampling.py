"""Fixed-seed samples during training (`SampleImages`), drawn with `vlhooks.sampling.euler_sample` through the
same injection handle as training, so a sample shows what the adapter does at this step. Latents are saved as
images: pixel-space ones as they are, others as their first channels clamped to [-1, 1] (a preview, not a decode).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

import vlhooks as vh
from vlhooks.images import to_uint8
from vlhooks.sampling import euler_sample


class SampleImages(L.Callback):
    """Every `every_n_steps` (and at the end) sample the first `count` training rows with fixed seeds and save
    `<run_dir>/samples/step-N.png`: the target image on top, the sample under it."""

    def __init__(self, run_dir, every_n_steps: int = 0, count: int = 4, steps: int = 10, seed: int = 0):
        self.run_dir, self.every, self.count, self.steps, self.seed = Path(run_dir), every_n_steps, count, steps, seed

    def _save(self, trainer, pl_module) -> None:
        from PIL import Image

        dm = trainer.datamodule
        rows = [dm.dataset[i] for i in range(min(self.count, len(dm.dataset)))]
        dev = pl_module.device
        lat = torch.stack([r["latents"] for r in rows]).to(dev)
        cap = torch.stack([r["caption"] for r in rows]).to(dev)
        mask = torch.arange(cap.shape[1], device=dev)[None] < torch.stack([r["caption_len"] for r in rows]).to(dev)[:, None]
        feats = torch.stack([r["features"] for r in rows]).to(dev)
        if feats.dim() == 4:  # augmented data (train/augment.py): the first (clean) reference variant
            feats = feats[:, 0]
        was_training = pl_module.training
        pl_module.eval()
        try:
            pl_module.handle.set_features(vh.VLFeatures(feats))
            # the precision plugin's forward context, as in a training step (FSDP's bf16 mixed precision casts the
            # DiT's weights for compute and relies on autocast for the inputs); the adapter whole on every rank
            with trainer.precision_plugin.forward_context(), pl_module.full_adapter():
                noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(self.seed))  # [B, C, H, W]
                out = euler_sample(pl_module.family, pl_module.dit, noise, cap, mask, steps=self.steps)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        tiles = [np.concatenate([to_uint8(lat[i]), to_uint8(out[i])], 0) for i in range(len(rows))]
        img = Image.fromarray(np.concatenate(tiles, 1)).convert("RGB")
        img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
        path = self.run_dir / "samples" / f"step-{trainer.global_step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)

    # Every rank samples (under FSDP the DiT's forward is a collective; under DDP the other ranks would only wait
    # for rank 0 at the next step); global rank 0 alone writes.
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module)
