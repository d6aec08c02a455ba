"""Fixed-seed samples during training: a plain Euler flow-matching sampler over `DiTFamily.velocity`.

The sampler integrates `dx/dsigma = v` from sigma 1 (noise) to 0 on a uniform grid, through the same injection
handle as training, so a sample shows what the adapter does at this step. Pixel-space latents are saved as
images; other latents as their first channels, min-max scaled (a preview, not a decode).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch

import vlhooks as vh


@torch.no_grad()
def euler_sample(family, dit, caption: torch.Tensor, caption_mask: torch.Tensor | None, shape: tuple, steps: int,
                 seed: int, pooled: torch.Tensor | None = None) -> torch.Tensor:
    """`x0` of shape `shape` from the seeded noise. `caption` `[B, L, C]`."""
    p = next(dit.parameters())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)  # [B, C, H, W]
    sigmas = torch.linspace(1.0, 0.0, steps + 1, device=p.device)
    for i in range(steps):
        v = family.velocity(dit, x, sigmas[i].expand(shape[0]), caption.to(p.dtype), caption_mask, pooled)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x.float()


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """`[C, H, W]` in [-1, 1] (pixels) -> HxWx3 uint8."""
    x = x[:3] if x.shape[0] >= 3 else x[:1].expand(3, -1, -1)
    return x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()


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
        was_training = pl_module.training
        pl_module.eval()
        try:
            pl_module.handle.set_features(vh.VLFeatures(feats))
            # the precision plugin's forward context, as in a training step (FSDP's bf16 mixed precision casts the
            # DiT's weights for compute and relies on autocast for the inputs); the adapter whole on every rank
            with trainer.precision_plugin.forward_context(), pl_module.full_adapter():
                out = euler_sample(pl_module.family, pl_module.dit, cap, mask, tuple(lat.shape), self.steps, self.seed)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        out = out.float()
        tiles = [np.concatenate([_to_uint8(lat[i]), _to_uint8(out[i])], 0) for i in range(len(rows))]
        img = Image.fromarray(np.concatenate(tiles, 1))
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
