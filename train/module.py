"""`AdapterModule`: fits an adapter on a frozen DiT with the DiT's own flow-matching objective.

The DiT (and any encoder) is frozen and stays in eval mode; only the adapter's parameters reach the optimizer.
Injection goes through `vlhooks.apply_injection`, exactly as at inference: the module calls
`handle.set_features` per batch and then the family's own forward (`DiTFamily.velocity`), so a trained adapter
and zero-shot share one code path, and a fresh adapter gives zero-shot's loss at step 0.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import get_ema_multi_avg_fn

import vlhooks as vh
from vlhooks.adapters import create_adapter
from vlhooks.models import family_for
from vlhooks.errors import CheckpointError, TrainingError

from .checkpoint_io import canonical_progress, saved_at_batch_end



def build_dit(spec: dict[str, Any]) -> torch.nn.Module:
    """A diffusers transformer from `{"class_name": ..., "config": {...}}` (random init, or class defaults when
    `config` is empty) and / or `{"pretrained": folder, "subfolder": "transformer"}`; `dtype` optional. On the meta
    device only the architecture is built (no weights are read)."""
    import diffusers

    spec = dict(spec)
    cls = getattr(diffusers, spec["class_name"])
    dtype = getattr(torch, spec.get("dtype", "float32"))
    on_meta = torch.empty(0).device.type == "meta"
    if spec.get("pretrained") and not on_meta:
        model = cls.from_pretrained(spec["pretrained"], subfolder=spec.get("subfolder"), torch_dtype=dtype)
    elif spec.get("checkpoint") and not on_meta:
        model = cls.from_pretrained(spec["checkpoint"], torch_dtype=dtype)
    else:
        torch.manual_seed(int(spec.get("seed", 0)))
        model = cls(**spec.get("config", {}))
        if dtype != torch.float32:  # (built in float32; `.to` only when another dtype is asked for)
            model = model.to(dtype)
    return model.eval().requires_grad_(False)


def sample_sigma(n: int, g: torch.Generator, sampling: str, mean: float, std: float, shift: float) -> torch.Tensor:
    """Noise levels in (0, 1): `uniform` or `logit_normal`, then the shift `s*sigma / (1 + (s-1)*sigma)`."""
    if sampling == "uniform":
        sigma = torch.rand(n, generator=g)
    elif sampling == "logit_normal":
        sigma = torch.sigmoid(mean + std * torch.randn(n, generator=g))
    else:
        raise TrainingError(f"model.timestep_sampling must be 'uniform' or 'logit_normal', got {sampling!r}.")
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def _to_device(t: torch.Tensor, dev: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t.to(dev, dtype)` without a stream sync on CUDA (pinned memory, `non_blocking`): a plain host-to-device copy
    waits for every kernel already queued, so the GPU would idle while the host catches up."""
    if dev.type == "cuda":
        t = t.pin_memory()
    return t.to(dev, dtype, non_blocking=True)


_DIT_KEYS = ("class_name", "config", "pretrained", "subfolder", "checkpoint", "dtype", "seed")


def check_dit_spec(dit: Any) -> None:
    """`TrainingError` for a `model.dit` that `build_dit` cannot build: no or an unknown diffusers class, unknown
    keys (of the spec or of the class's `config`), an unknown dtype."""
    import difflib
    import inspect

    import diffusers

    def hint(name, known):
        close = difflib.get_close_matches(str(name), list(known), n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""

    if not isinstance(dit, dict) or not dit.get("class_name"):
        raise TrainingError("model.dit needs class_name, a diffusers transformer class (e.g. "
                            "ZImageTransformer2DModel), and config or pretrained.")
    bad = [k for k in dit if k not in _DIT_KEYS]
    if bad:
        raise TrainingError(f"model.dit has unknown key {bad[0]!r}{hint(bad[0], _DIT_KEYS)}; its keys are "
                            f"{', '.join(_DIT_KEYS)}.")
    name = dit["class_name"]
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        known = [n for n in dir(diffusers) if n.endswith("Transformer2DModel")]
        raise TrainingError(f"model.dit.class_name {name!r} is not a diffusers model class{hint(name, known)}; "
                            f"use one of {', '.join(sorted(known)[:6])}, ...")
    config = dit.get("config") or {}
    if not isinstance(config, dict):
        raise TrainingError(f"model.dit.config must be a mapping of {name} arguments, got {config!r}.")
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = [k for k in params if k != "self"]
        bad = [k for k in config if k not in params]
        if bad:
            raise TrainingError(f"model.dit.config has unknown key {bad[0]!r}{hint(bad[0], known)}: {name} takes "
                                f"{', '.join(known)}.")
    if not isinstance(getattr(torch, str(dit.get("dtype", "float32")), None), torch.dtype):
        raise TrainingError(f"model.dit.dtype {dit.get('dtype')!r} is not a torch dtype; use float32, bfloat16 or "
                            "float16.")


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                 integer: bool = False, low_open: bool = False, high_open: bool = False, example: str = "") -> None:
    """`TrainingError` unless `value` is a (finite; integer) number in the range, naming the option and the fix."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise TrainingError(f"{name} must be {kind}{' ' + rng if rng else ''}, got {value!r}"
                            f"{'; use e.g. ' + example if example else ''}.")


class AdapterModule(L.LightningModule):
    """Train one adapter on a frozen DiT.

    Args:
        dit: how to build the DiT (see `build_dit`).
        adapter: `{"type": "projection" | "kv" | "lora", "feature_width": int, "blocks": ..., ...options}`, given
            to `vlhooks.adapters.create_adapter` (the options are the type's typed options: projection `kind`,
            `num_tokens`, ...; lora `rank`, `alpha`, `dropout`; kv `projection`); `blocks` defaults to the
            injection's.
        injection: the `InjectionConfig` fields used in training and saved with the adapter.
        lr, weight_decay, betas, warmup_steps: AdamW and a linear warm-up.
        drop_image, drop_text, drop_both: per-row drop rates (image: no injection; text: the empty caption).
        timestep_sampling, logit_mean, logit_std, shift: how sigma is drawn.
        gradient_checkpointing: checkpoint the DiT's blocks (less memory, one more forward).
        ema_decay: keep an EMA of the adapter (exported checkpoints then hold the EMA weights).
        seed: every random draw of a step comes from `(seed, global_step, global_rank)`, so resuming is exact
            and, under `ddp` / `fsdp`, each rank draws its own noise (rank 0 draws what a one-process run draws).
        run_name, checkpoint_root: adapter checkpoints go to `<checkpoint_root>/<run_name>/`.
        save_every_n_steps: also write `step-N/` every N steps (0: only `final/`).
        sample_every_n_steps, sample_count: fixed-seed samples of the first training rows every N steps (0: only
            at the end; `sample_count` 0: none), saved under `<checkpoint_root>/<run_name>/samples/`.
        lr_schedule, min_lr_ratio: after the warm-up, `constant`, `cosine` or `linear` down to `min_lr_ratio`.
        flow_weight, distill_weight, token_weight, class_weight (with num_classes): the objective's terms (flow
            matching, caption distillation, caption-token regression, reference classification; train/objectives.py).
    """

    def __init__(
        self,
        dit: dict[str, Any],
        adapter: dict[str, Any],
        injection: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        drop_image: float = 0.05,
        drop_text: float = 0.05,
        drop_both: float = 0.05,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 1.0,
        gradient_checkpointing: bool = False,
        ema_decay: float | None = None,
        seed: int = 0,
        run_name: str = "run",
        checkpoint_root: str = "checkpoints",
        save_every_n_steps: int = 0,
        sample_every_n_steps: int = 0,
        sample_count: int = 4,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        flow_weight: float = 1.0,
        distill_weight: float = 0.0,
        token_weight: float = 0.0,
        class_weight: float = 0.0,
        num_classes: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters()
        # every option checked before anything is built: a TrainingError naming the option and the fix
        from vlhooks.adapters import ADAPTER_TYPES

        check_dit_spec(dit)
        if not isinstance(adapter, dict) or adapter.get("type") not in ADAPTER_TYPES:
            got = adapter.get("type") if isinstance(adapter, dict) else adapter
            raise TrainingError(f"model.adapter.type must be one of {', '.join(sorted(ADAPTER_TYPES))}, got {got!r}; "
                                "e.g. model.adapter: {type: projection, kind: mlp}.")
        check_number("model.lr", lr, 0, low_open=True, example="1e-4")
        check_number("model.weight_decay", weight_decay, 0)
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise TrainingError(f"model.betas must be two numbers in [0, 1), got {betas!r}; use e.g. [0.9, 0.999].")
        for i, b in enumerate(betas):
            check_number(f"model.betas[{i}]", b, 0, 1, high_open=True, example="[0.9, 0.999]")
        check_number("model.warmup_steps", warmup_steps, 0, integer=True)
        for name, rate in (("drop_image", drop_image), ("drop_text", drop_text), ("drop_both", drop_both)):
            check_number(f"model.{name}", rate, 0, 1, example="0.05")
        if drop_image + drop_text + drop_both > 1.0:
            raise TrainingError(f"model.drop_image + drop_text + drop_both must be at most 1, got "
                                f"{drop_image + drop_text + drop_both:g}; lower them (IP-Adapter used 0.05 each).")
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise TrainingError(f"model.timestep_sampling must be 'uniform' or 'logit_normal', got "
                                f"{timestep_sampling!r}.")
        check_number("model.logit_mean", logit_mean)
        check_number("model.logit_std", logit_std, 0, low_open=True, example="1.0")
        check_number("model.shift", shift, 0, low_open=True, example="1.0 (3.0 for Flux / SD3 at 1024 px)")
        if ema_decay is not None:
            check_number("model.ema_decay", ema_decay, 0, 1, low_open=True, high_open=True, example="0.999")
        check_number("model.seed", seed, 0, integer=True)
        from .objectives import SCHEDULES  # lr schedules and caption distillation (train/objectives.py)

        if lr_schedule not in SCHEDULES:
            raise TrainingError(f"model.lr_schedule must be one of {', '.join(SCHEDULES)}, got {lr_schedule!r}.")
        check_number("model.min_lr_ratio", min_lr_ratio, 0, 1, example="0.1")
        check_number("model.flow_weight", flow_weight, 0, example="1.0")
        check_number("model.distill_weight", distill_weight, 0, example="1.0")
        check_number("model.token_weight", token_weight, 0, example="1.0")
        check_number("model.class_weight", class_weight, 0, example="0.1")
        check_number("model.num_classes", num_classes, 2, integer=True, example="10")
        if not isinstance(run_name, str) or not run_name.strip() or run_name in (".", "..") or "/" in run_name \
                or "\\" in run_name:
            raise TrainingError(f"model.run_name must be a folder name (no slashes), got {run_name!r}.")
        for name, n in (("save_every_n_steps", save_every_n_steps), ("sample_every_n_steps", sample_every_n_steps),
                        ("sample_count", sample_count)):
            check_number(f"model.{name}", n, 0, integer=True)
        self.dit = build_dit(dit)
        self.family = family_for(self.dit)
        if gradient_checkpointing:
            self.dit.enable_gradient_checkpointing()
        self.injection = vh.InjectionConfig.from_dict(injection or {})
        spec = dict(adapter)
        kind = spec.pop("type", None)
        obj = create_adapter(kind, self.dit, feature_width=spec.pop("feature_width", None),
                             blocks=spec.pop("blocks", self.injection.blocks), **spec)
        obj.config.injection = self.injection.to_dict()
        self.adapter = obj.float() if kind == "projection" else obj
        from .objectives import class_head  # the reference-class objective's training-only head (objectives.py)

        self.class_head = class_head(self.adapter, num_classes) if class_weight else None
        self.ema: list[torch.Tensor] | None = None
        self.handle: vh.InjectionHandle | None = None
        self.strict_loading = False  # checkpoints hold the adapter only
        self._cudnn_sdp_before: bool | None = None  # set while `training_attention` has cuDNN's SDPA off

    # ------------------------------------------------------------------ lifecycle
    def train(self, mode: bool = True):
        super().train(mode)
        self.dit.eval()  # frozen: no dropout, whatever Lightning does to the rest
        return self

    def setup(self, stage: str) -> None:
        # Inject before the strategy wraps the model: FSDP replaces `self.dit` and its blocks by wrappers (the
        # hooks stay on the real modules, which the wrappers call).
        if stage == "fit" and self.handle is None:
            self.handle = vh.apply_injection(self.dit, None, self.injection, adapter=self.adapter)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and dm.dataset is not None and dm.feature_width != self.adapter.config.feature_width:
            raise ValueError(f"the data's features have width {dm.feature_width} but the adapter expects "
                             f"{self.adapter.config.feature_width}; set model.adapter.feature_width.")
        if dm is not None and hasattr(dm, "image_encoder_spec"):
            self.adapter.config.feature_source = dict(dm.image_encoder_spec)

    def on_fit_start(self) -> None:
        if self.handle is None:
            self.handle = vh.apply_injection(self.dit, None, self.injection, adapter=self.adapter)
        self.training_attention(True)
        # Several processes: every rank runs the same graph every step. A row whose image is dropped (or that is
        # outside the injection window) still computes the extras, at strength 0 (an exact zero contribution),
        # instead of skipping them. Otherwise a rank whose rows all dropped their image skips the extras' embedding
        # (the context refiner) and has nothing in its DiT to backpropagate through, while the other rank gathers
        # those FSDP units: FSDP's gathers and reduce-scatters are collectives, and the ranks hang. One process
        # (and every test that compares bit for bit) keeps the exact skip.
        self.handle.injector.same_graph = self.trainer.world_size > 1
        if self.hparams.ema_decay and self.ema is None:
            with self.full_adapter():
                self.ema = [p.detach().clone() for p in self.adapter.trainable_parameters()]

    def on_fit_end(self) -> None:
        self.release()

    def release(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.training_attention(False)

    def training_attention(self, on: bool) -> None:
        """Switch cuDNN's SDPA kernel off for the fit where the family's training shapes break its backward
        (`DiTFamily.cudnn_attention_training`), and back to what it was (`on=False`). A process-wide switch:
        gradient checkpointing recomputes the forward during backward, outside any context a step could open."""
        if on and not self.family.cudnn_attention_training and torch.cuda.is_available():
            if self._cudnn_sdp_before is None:
                self._cudnn_sdp_before = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        elif not on and self._cudnn_sdp_before is not None:
            torch.backends.cuda.enable_cudnn_sdp(self._cudnn_sdp_before)
            self._cudnn_sdp_before = None

    @contextmanager
    def full_adapter(self, writeback: bool = False):
        """Inside, the adapter's parameters are whole tensors on every rank.

        Only FSDP needs this: between steps it keeps each rank's shard of the adapter (the parameters are then
        flat slices). There it gathers the FSDP unit holding the adapter (the root one, with the wrap policy of
        `vlhooks train`, which puts the DiT's layers in their own units), so it is a collective: every rank must
        enter it. `writeback=True` keeps in-place changes made inside. Elsewhere it does nothing."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        model = getattr(strategy, "model", None)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not isinstance(model, FSDP):
            yield
            return
        recurse = any(isinstance(m, FSDP) for m in self.adapter.modules())  # a policy that wrapped the adapter
        with FSDP.summon_full_params(model, recurse=recurse, writeback=writeback):
            yield

    # ------------------------------------------------------------------ step
    def _step_generator(self) -> torch.Generator:
        # Global rank 0 (and every one-process run) keeps the `(seed, step)` stream, so single-process runs and
        # their resumes are unchanged; rank r is offset by r * 2**24 (the CPU generator keeps 32 bits of its
        # seed, so ranks stay apart for the first 16.7 M steps of a run).
        return torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + int(self.global_step)
                                             + int(self.global_rank) * (1 << 24))

    def compute_loss(self, batch: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
        h = self.hparams
        x0 = batch["latents"]  # [B, C, H, W]
        B, dev = x0.shape[0], x0.device
        caption = batch["caption"].clone()  # [B, L, C]
        cap_len = batch["caption_len"].clone()
        u = torch.rand(B, generator=g)
        drop_img = u < h.drop_image + 0.0
        drop_txt = (u >= h.drop_image) & (u < h.drop_image + h.drop_text)
        both = (u >= h.drop_image + h.drop_text) & (u < h.drop_image + h.drop_text + h.drop_both)
        drop_img, drop_txt = drop_img | both, drop_txt | both
        if drop_txt.any():
            empty = self.trainer.datamodule.empty_caption.to(dev, caption.dtype)  # [L0, C]
            caption[drop_txt.to(dev)] = 0.0
            caption[drop_txt.to(dev), : empty.shape[0]] = empty
            cap_len[drop_txt.to(dev)] = empty.shape[0]
        pooled = batch.get("pooled")  # [B, P] (Flux, SD3) or None
        if pooled is not None and drop_txt.any():
            pooled = pooled.clone()
            pooled[drop_txt.to(dev)] = self.trainer.datamodule.empty_pooled.to(dev, pooled.dtype)
        mask = torch.arange(caption.shape[1], device=dev)[None] < cap_len[:, None]  # [B, L]
        sigma = _to_device(sample_sigma(B, g, h.timestep_sampling, h.logit_mean, h.logit_std, h.shift), dev)
        noise = _to_device(torch.randn(x0.shape, generator=g), dev, x0.dtype)
        from .augment import pick_variant
        from .objectives import teacher_prediction

        # augmented data (train/augment.py): one of each row's reference variants; plain features pass through
        feats, fmask = pick_variant(batch["features"], batch.get("feature_mask"), g)
        teacher = None if not h.get("distill_weight") else teacher_prediction(
            self, batch, x0, noise, sigma, pooled, feats, fmask)
        self.handle.set_features(vh.VLFeatures(feats, mask=fmask), active=(~drop_img).tolist())
        dtype = next(self.dit.parameters()).dtype
        with self._dit_precision(dev, dtype):
            pred, target = self.family.prediction_and_target(self.dit, x0, noise, sigma, caption.to(dtype), mask,
                                                             None if pooled is None else pooled.to(dtype))
        if teacher is None and not h.get("token_weight") and not h.get("class_weight"):
            return F.mse_loss(pred.float(), target.float())
        keep = (~drop_img).to(dev)  # rows without a reference do not depend on the adapter
        loss = h.get("flow_weight", 1.0) * F.mse_loss(pred.float(), target.float())
        if teacher is not None:
            dist = ((pred.float() - teacher.float()) ** 2).flatten(1).mean(1)
            loss = loss + h.distill_weight * (dist * keep).sum() / keep.sum().clamp_min(1)
        if h.get("token_weight"):  # the adapter's caption-space tokens against the teacher caption's (objectives.py)
            from .objectives import caption_token_loss

            loss = loss + h.token_weight * caption_token_loss(self.adapter, batch, feats, fmask)
        if h.get("class_weight"):  # the reference's class read from the adapter (objectives.py)
            from .objectives import reference_class_loss

            loss = loss + h.class_weight * reference_class_loss(self.class_head, self.adapter, batch, feats, fmask,
                                                                keep, h.num_classes)
        return loss

    # A bf16 / fp16 DiT runs its forward in its own dtype, outside the `bf16-mixed` autocast: what Lightning's
    # `bf16-true` does to a module, how the DiT runs at inference, and what the training floor of
    # shared/bench/gpu_baseline.py computes; the adapter keeps its own weights (fp32 for a projection: fp32 masters)
    # and casts at its boundary. Measured on an H200 (benchmarks/NOTES.md, section 6): the same step time as under
    # autocast (Z-Image 512^2 batch 4: 0.980 vs 0.984 of the floor, inside the repeats' spread). False keeps
    # autocast over the DiT (the behaviour before). FSDP always keeps autocast (its mixed precision relies on it).
    native_dit_precision: bool = True

    def _dit_precision(self, dev: torch.device, dtype: torch.dtype):
        if not (self.native_dit_precision and dtype in (torch.bfloat16, torch.float16)
                and torch.is_autocast_enabled(dev.type) and torch.get_autocast_dtype(dev.type) == dtype):
            return nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(getattr(strategy, "model", None), FSDP):
            return nullcontext()
        return torch.autocast(dev.type, enabled=False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch, self._step_generator())
        if self._trainer is not None and (self.trainer.world_size > 1 or not loss.requires_grad):
            # DDP's gradient reduction and FSDP's reduce-scatter are collectives every rank must join. The ranks
            # run the same graph (`same_graph`, set in `on_fit_start`); a zero term also keeps every adapter
            # parameter in it where nothing uses one (e.g. a block at scale 0): the loss is unchanged, such a
            # parameter gets a zero gradient instead of none, and plain `ddp` needs no find_unused_parameters.
            # One process: only when nothing was injected this step (every row dropped its image, or is outside
            # the injection window), whose loss would otherwise have no graph for Lightning's backward.
            loss = loss + 0.0 * sum(p.sum() for p in self.adapter.trainable_parameters())
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch["latents"].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            with self.full_adapter():
                params = [p.detach() for p in self.adapter.trainable_parameters()]
                get_ema_multi_avg_fn(self.hparams.ema_decay)(self.ema, params, torch.tensor(self.global_step))

    def configure_optimizers(self):
        params = list(self.adapter.trainable_parameters())
        if self.class_head is not None:
            params += list(self.class_head.parameters())
        # one fused kernel for the whole update where every parameter is on a GPU (foreach elsewhere)
        fused = {"fused": True} if params and all(p.is_cuda and p.is_floating_point() for p in params) else {}
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                weight_decay=self.hparams.weight_decay, **fused)
        warm = max(0, int(self.hparams.warmup_steps))
        from .objectives import lr_factor

        h = self.hparams
        total = int(self.trainer.max_steps) if self._trainer is not None and self.trainer.max_steps > 0 else None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
            s, warm, total, h.get("lr_schedule", "constant"), h.get("min_lr_ratio", 0.0)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints: the adapter only
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning calls this on every rank (the strategy then writes rank 0's dict), so gathering is safe.
        with self.full_adapter():
            checkpoint["state_dict"] = {f"adapter.{k}": v.detach().clone()
                                        for k, v in self.adapter.trainable_state_dict().items()}
            if self.class_head is not None:  # training-only, kept for an exact resume (not in the adapter folder)
                checkpoint["state_dict"].update({f"class_head.{k}": v.detach().clone()
                                                 for k, v in self.class_head.state_dict().items()})
        if self.ema is not None:
            checkpoint["adapter_ema"] = [t.clone() for t in self._ema_now()]
        if self._trainer is not None:  # the loop counters as a function of the global step (see canonical_progress)
            canonical_progress(checkpoint, self.trainer.num_training_batches, self.trainer.accumulate_grad_batches)

    def _ema_now(self) -> list[torch.Tensor]:
        """The EMA as of the current global step. A checkpoint or export written by a callback's
        `on_train_batch_end` comes before this module's `on_train_batch_end` applies the step's EMA update
        (Lightning calls the callbacks first); without it, a run resumed from that checkpoint would never apply
        that step's update. The same update is applied here to a copy (bit for bit what the hook then does)."""
        if self._trainer is None or not saved_at_batch_end(self.trainer):
            return self.ema
        ema = [t.clone() for t in self.ema]
        with self.full_adapter():
            params = [p.detach() for p in self.adapter.trainable_parameters()]
            get_ema_multi_avg_fn(self.hparams.ema_decay)(ema, params, torch.tensor(self.global_step))
        return ema

    def _check_resumable(self, checkpoint: dict[str, Any], where: Any = None) -> None:
        """`CheckpointError` when the checkpoint holds another adapter (type, or names and shapes) than this run's,
        before Lightning would fail on the optimizer's parameter groups or a size mismatch."""
        where = where or getattr(self._trainer, "ckpt_path", None) or "the checkpoint"
        saved_type = ((checkpoint.get("hyper_parameters") or {}).get("adapter") or {}).get("type")
        ours = self.hparams.adapter.get("type")
        if saved_type is not None and saved_type != ours:
            raise CheckpointError(
                f"{where} was written by a run training a {saved_type!r} adapter, but this run trains a {ours!r} "
                f"one: resume with the recipe it was trained with (model.adapter.type: {saved_type}), or train the "
                f"{ours} adapter under another --model.run_name.")
        if "state_dict" not in checkpoint:  # SafetensorsFSDPStrategy loaded it already (`vlhooks train` checked it)
            return
        saved = {k.removeprefix("adapter."): tuple(v.shape) for k, v in checkpoint["state_dict"].items()
                 if not k.startswith("class_head.")}
        with self.full_adapter():
            own = {k: tuple(v.shape) for k, v in self.adapter.trainable_state_dict().items()}
        if saved != own:
            missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
            shapes = [f"{k}: {saved[k]} vs {own[k]}" for k in sorted(set(own) & set(saved)) if saved[k] != own[k]]
            detail = "; ".join(x for x in (f"missing {missing[:3]}" if missing else "",
                                           f"unexpected {unexpected[:3]}" if unexpected else "",
                                           f"shapes {shapes[:3]}" if shapes else "") if x)
            raise CheckpointError(
                f"{where} holds a {saved_type or ours} adapter of another configuration than this run's ({detail}): "
                "resume with the model.adapter and model.injection settings it was trained with, or train this "
                "one under another --model.run_name.")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_resumable(checkpoint)
        # saved under the adapter's saved names (`trainable_state_dict`); Lightning loads the module's own names
        state = checkpoint.get("state_dict", {})
        head = {k: v for k, v in state.items() if k.startswith("class_head.")}
        if self.class_head is not None and len(head) != len(self.class_head.state_dict()):
            raise CheckpointError(f"{getattr(self._trainer, 'ckpt_path', None) or 'the checkpoint'} was written "
                                  "without model.class_weight: resume with the settings it was trained with.")
        saved = {k.removeprefix("adapter."): v for k, v in state.items() if not k.startswith("class_head.")}
        checkpoint["state_dict"] = {f"adapter.{k}": v for k, v in self.adapter.module_state(saved).items()}
        if self.class_head is not None:
            checkpoint["state_dict"].update(head)
        if "adapter_ema" in checkpoint:
            self.ema = [t.clone() for t in checkpoint["adapter_ema"]]

    def export_adapter(self, path) -> None:
        """Write the adapter folder (EMA weights when enabled), atomically, from global rank 0. Under FSDP every
        rank must call it (the adapter is gathered first); the others write nothing."""
        write = self._trainer is None or self.trainer.is_global_zero
        ema = self._ema_now() if self.ema is not None else None  # (gathers under FSDP when it updates)
        with self.full_adapter(writeback=self.ema is not None):
            if self.ema is None:
                if write:
                    self.adapter.save(path)
                return
            params = self.adapter.trainable_parameters()
            live = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, e in zip(params, ema):
                    p.copy_(e)
                try:
                    if write:
                        self.adapter.save(path)
                finally:
                    for p, x in zip(params, live):
                        p.copy_(x)


def trainable_count(module: AdapterModule) -> int:
    return sum(p.numel() for p in module.adapter.trainable_parameters())


__all__ = ["AdapterModule", "build_dit", "sample_sigma", "trainable_count"]
