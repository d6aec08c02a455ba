"""Extra training objectives of `AdapterModule`, and its learning-rate schedules.

Caption distillation (`model.distill_weight > 0`, with `data.teacher_caption_template`): the frozen DiT itself is
the teacher. For the same noisy input and noise level, the teacher sees the row's full caption (e.g. "a
handwritten digit seven") and no reference; the student sees the training caption (e.g. "a handwritten digit",
which names no class) and the reference through the adapter. The term `distill_weight * MSE(student, teacher)`
asks the reference to carry what the caption carried, with the teacher's own low-variance prediction as the
target instead of the noisy flow-matching target alone (`model.flow_weight` weighs that one). Rows whose
reference is dropped take no part (the student there does not depend on the adapter).

Caption-token regression (`model.token_weight > 0`, same teacher captions): an adapter with a projection into the
caption space (`projection`, or `kv` with a projection in front) maps the reference to caption-space tokens; this
term asks its first `L` tokens to equal the `L` token embeddings of the row's teacher caption (MSE over the
caption's real tokens). The DiT's own caption path then embeds them exactly as it embeds that caption (an extra
token takes the position the caption token would), so the reference is injected as the caption it shows. It needs
no pass through the DiT, so it is a strong and cheap signal; a `resampler` projection with `num_tokens` set to the
caption length emits a token sequence of the caption's shape.

Reference classification (`model.class_weight > 0`, items with labels): a linear head, trained with the adapter and
thrown away after (it is in resume checkpoints, not in the adapter folder), reads the reference's class from the
mean of the projection's caption-space tokens; the term `class_weight * cross-entropy` asks those tokens to keep
the classes apart from the first steps, where the distillation's signal through the DiT is weak. With a codebook
projection (`codes`, adapters/projection.py) no head is built: the term is the cross-entropy of the router's own
logits, so each class learns to route to one code, which the DiT's objective then shapes into what it reads.
"""

from __future__ import annotations

import contextlib
import math

import torch

import vlhooks as vh
from vlhooks.errors import TrainingError

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, warmup: int, total: int | None, schedule: str, min_ratio: float) -> float:
    """The learning-rate multiplier at optimizer step `step`: a linear warm-up over `warmup` steps, then
    `constant`, or a `cosine` / `linear` decay to `min_ratio` at step `total` (the trainer's max_steps)."""
    if schedule not in SCHEDULES:
        raise TrainingError(f"model.lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or not total or total <= warmup:
        return 1.0
    u = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * u)) if schedule == "cosine" else 1.0 - u
    return min_ratio + (1.0 - min_ratio) * decay


@torch.no_grad()
def teacher_prediction(module, batch: dict, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                       pooled: torch.Tensor | None, features: torch.Tensor, feature_mask: torch.Tensor | None):
    """The frozen DiT's prediction for the rows' teacher captions, without a reference (the handle's rows all
    switched off); `[B, ...]` like the student's."""
    if "teacher_caption" not in batch:
        raise TrainingError("model.distill_weight > 0 needs the teacher's captions: set data.teacher_caption_template "
                            "(e.g. '{caption}', the item's own caption).")
    dev = x0.device
    cap = batch["teacher_caption"]
    mask = torch.arange(cap.shape[1], device=dev)[None] < batch["teacher_caption_len"].to(dev)[:, None]
    module.handle.set_features(vh.VLFeatures(features, mask=feature_mask), active=[False] * x0.shape[0])
    dtype = next(module.dit.parameters()).dtype
    precision = getattr(module, "_dit_precision", None)
    with (precision(dev, dtype) if precision is not None else contextlib.nullcontext()):
        pred, _ = module.family.prediction_and_target(module.dit, x0, noise, sigma, cap.to(dtype), mask,
                                                      None if pooled is None else pooled.to(dtype))
    return pred.detach()


def caption_token_loss(adapter, batch: dict, features: torch.Tensor, feature_mask: torch.Tensor | None) -> torch.Tensor:
    """MSE between the adapter's caption-space tokens and the teacher caption's token embeddings (over the
    caption's real tokens, at most as many as the adapter emits)."""
    proj = _projection_of(adapter, "token_weight")
    if "teacher_caption" not in batch:
        raise TrainingError("model.token_weight > 0 needs the teacher's captions: set data.teacher_caption_template.")
    dtype = next(proj.parameters()).dtype
    out = proj.project(features.to(dtype), feature_mask).float()  # [B, M, C]
    target = batch["teacher_caption"].to(out.device).float()  # [B, L, C]
    n = min(out.shape[1], target.shape[1])
    valid = torch.arange(n, device=out.device)[None] < batch["teacher_caption_len"].to(out.device)[:, None]  # [B, n]
    err = ((out[:, :n] - target[:, :n]) ** 2).mean(-1)  # [B, n]
    return (err * valid).sum() / valid.sum().clamp_min(1)


def _projection_of(adapter, option: str):
    proj = adapter if hasattr(adapter, "project") else getattr(adapter, "projection", None)
    if proj is None:
        raise TrainingError(f"model.{option} needs an adapter with a projection into the caption space: a "
                            "projection adapter, or a kv / lora adapter with `projection` (e.g. {kind: mlp}).")
    return proj


def class_head(adapter, num_classes: int) -> torch.nn.Linear | None:
    """The training-only head of `reference_class_loss`: caption width -> `num_classes` logits; None for a
    projection with a codebook, whose router's logits are read instead (it needs `codes` >= `num_classes`)."""
    proj = _projection_of(adapter, "class_weight")
    if getattr(proj, "codebook", None) is not None:
        if proj.config.options.codes < num_classes:
            raise TrainingError(f"model.class_weight with a codebook reads the router's logits: its codes "
                                f"({proj.config.options.codes}) must be at least model.num_classes ({num_classes}).")
        return None
    return torch.nn.Linear(proj.config.caption_width, num_classes)


def reference_class_loss(head, adapter, batch: dict, features: torch.Tensor, feature_mask: torch.Tensor | None,
                         keep: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Cross-entropy of `head` over the mean of the adapter's caption-space tokens (head None: of the codebook
    router's first `num_classes` logits) against the rows' labels (rows in `keep`: those whose reference is
    injected)."""
    if "label" not in batch:
        raise TrainingError("model.class_weight > 0 needs labelled items: use a source with labels (mnist, digits) "
                            "or give a folder source a label column.")
    proj = _projection_of(adapter, "class_weight")
    dtype = next(proj.parameters()).dtype
    if head is None:  # the codebook's router
        logits = proj.codebook.logits(features.to(dtype), feature_mask)[:, :num_classes].float()  # [B, K]
    else:
        out = proj.project(features.to(dtype), feature_mask).float()  # [B, M, C]
        m = proj.output_mask(feature_mask)
        w = torch.ones(out.shape[:2], device=out.device) if m is None else m.to(out.device).float()  # [B, M]
        pooled = (out * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # [B, C]
        logits = head(pooled.to(head.weight.dtype)).float()  # [B, K]
    labels = torch.as_tensor(batch["label"], device=logits.device).long()  # [B]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise TrainingError(f"model.class_weight: labels span {int(labels.min())}..{int(labels.max())} but "
                            f"model.num_classes is {num_classes}; set model.num_classes to at least "
                            f"{int(labels.max()) + 1}.")
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1)
