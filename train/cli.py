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
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import FSDPStrategy

from .callbacks import AdapterExport, default_loggers
from .checkpoint_io import SafetensorsCheckpointIO, SafetensorsFSDPStrategy
from .data import PairsDataModule
from .module import AdapterModule
from .sampling import SampleImages


def fsdp_units(module: AdapterModule) -> list[torch.nn.Module]:
    """The DiT's modules that `fsdp` makes FSDP units: the DiT itself, and in every block each child with
    weights except its norms and modulation (so: the attention, the feed-forwards / MLP projections), except in
    the blocks the extras' embedding runs (`_embedding_blocks`: Z-Image's context refiner).

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
    dit = module.dit
    units = [dit]
    skip = _embedding_blocks(module)
    for site in module.family.sites(dit):
        if id(site.block(dit)) in skip:
            continue
        for name, child in site.block(dit).named_children():
            if any(True for _ in child.parameters()) and not any(w in name.lower() for w in ("norm", "adaln", "mod")):
                units.append(child)
    return units


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
        strategy = cfg.get("strategy")
        if isinstance(strategy, str) and strategy in ("fsdp", "fsdp_cpu_offload"):
            extra["strategy"] = SafetensorsFSDPStrategy(cpu_offload=strategy == "fsdp_cpu_offload")
        extra.setdefault("default_root_dir", str(run_dir))
        every = int(h.save_every_n_steps) or None
        extra["callbacks"] = list(cfg.get("callbacks") or []) + [
            ModelCheckpoint(dirpath=str(run_dir / "lightning"), filename="step-{step}", save_last=True,
                            save_top_k=0, every_n_train_steps=every),
            AdapterExport(run_dir, every_n_steps=int(h.save_every_n_steps)),
            SampleImages(run_dir, every_n_steps=int(h.sample_every_n_steps), count=int(h.sample_count)),
        ]
        trainer = super().instantiate_trainer(**extra, **kwargs)
        if isinstance(trainer.strategy, FSDPStrategy) and "auto_wrap_policy" not in trainer.strategy.kwargs:
            from torch.distributed.fsdp.wrap import CustomPolicy

            units = {id(m) for m in fsdp_units(self.model)}
            trainer.strategy.kwargs["auto_wrap_policy"] = CustomPolicy(lambda m: id(m) in units)
        return trainer


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = VLHooksCLI(AdapterModule, PairsDataModule, args=["fit", *argv], save_config_kwargs={"overwrite": True},
                     trainer_defaults={"enable_checkpointing": True}, seed_everything_default=0)
    cli.model.release()
    return 0
