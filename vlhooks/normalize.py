"""Normalisation of VL features toward a DiT's caption space, and the reference statistics it matches.

Owns: detection of attention-sink positions (tokens whose norm dwarfs the rest) and massive-activation dimensions
(dims whose peak dwarfs the typical per-dim scale), which dominate VLM hidden-state statistics (shared research
origin.md §2.4) and are therefore left out of every statistic; global std matching; per-dimension matching to
reference mean/std (optionally position-aware); their hybrid; outlier handling (`zero`, `clamp`); and
`compute_reference_stats` over a prompt file, saved/loaded as safetensors.

Definitions (per batch row, over real tokens only):
    sink position   ||x_t|| > sink_ratio * median_t ||x_t||
    clean positions real tokens that are not sinks
    massive dim     max_clean |x[:, d]| > massive_ratio * median_d rms_clean(x[:, d])
    std             population std (divide by n)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .errors import FeatureError
from .features import VLFeatures

MODES = ("none", "global", "per_dim", "hybrid")
OUTLIER_MODES = ("none", "zero", "clamp")


# ------------------------------------------------------------------------------------------------ detection
def _rows(tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """[B, N, D] tokens and [B, N] bool mask from 2-D or 3-D input; the flag says the input was 2-D."""
    if tokens.ndim == 2:
        valid = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device) if mask is None else mask
        return tokens.unsqueeze(0), valid.reshape(1, -1).bool(), True
    if tokens.ndim != 3:
        raise FeatureError(f"Expected tokens [N, D] or [B, N, D], got shape {tuple(tokens.shape)}.")
    valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
    return tokens, valid, False


def _sinks_row(x: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N] bool sinks of one row x [N, D]."""
    norms = x.double().norm(dim=-1)  # [N]
    med = norms[valid].median()
    return valid & (norms > ratio * med)


def _massive_row(x: torch.Tensor, clean: torch.Tensor, ratio: float) -> torch.Tensor:
    """[D] bool massive dims of one row x [N, D] over its clean positions."""
    xc = x[clean].double()  # [n, D]
    if xc.shape[0] == 0:
        return torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    rms = xc.pow(2).mean(0).sqrt()  # [D]
    return xc.abs().amax(0) > ratio * rms.median()


def find_sink_positions(tokens: torch.Tensor, mask: torch.Tensor | None = None, ratio: float = 10.0) -> torch.Tensor:
    """Attention-sink positions: bool [B, N] (or [N] for [N, D] input), `||x_t|| > ratio * median ||x||`."""
    x, valid, flat = _rows(tokens, mask)
    out = torch.stack([_sinks_row(x[b], valid[b], ratio) for b in range(x.shape[0])])
    return out[0] if flat else out


def find_massive_dims(tokens: torch.Tensor, mask: torch.Tensor | None = None, ratio: float = 100.0,
                      sinks: torch.Tensor | None = None, sink_ratio: float = 10.0) -> torch.Tensor:
    """Massive-activation dims: bool [B, D] (or [D]), measured on non-sink real tokens."""
    x, valid, flat = _rows(tokens, mask)
    if sinks is None:
        sinks = torch.stack([_sinks_row(x[b], valid[b], sink_ratio) for b in range(x.shape[0])])
    sinks = sinks.reshape(valid.shape)
    out = torch.stack([_massive_row(x[b], valid[b] & ~sinks[b], ratio) for b in range(x.shape[0])])
    return out[0] if flat else out


# ------------------------------------------------------------------------------------------------ reference
@dataclass
class ReferenceStats:
    """Per-dimension statistics of a text encoder's layer over prompts (sink positions excluded).

    `mean`/`std` [D] pool every clean position; `pos_mean`/`pos_std` [P, D] are per position bucket (bucket p =
    token index p, the last bucket holds every index >= P-1; buckets seen fewer than `min_count` times hold the
    pooled values); `pos_count` [P] is how many tokens each bucket saw. `global_mean`/`global_std` are scalars
    over clean positions and non-massive dims. `meta` records encoder, layer, prompt count and thresholds.
    """

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    pos_mean: torch.Tensor  # [P, D]
    pos_std: torch.Tensor  # [P, D]
    pos_count: torch.Tensor  # [P] int64
    global_mean: float
    global_std: float
    massive_dims: torch.Tensor  # [K] int64
    meta: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.mean.shape[0]

    def at(self, n: int, position_aware: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std [n, D] for token indices 0..n-1 (index i reads bucket min(i, P-1) when position-aware)."""
        if not position_aware:
            return self.mean.expand(n, -1), self.std.expand(n, -1)
        idx = torch.arange(n).clamp_max(self.pos_mean.shape[0] - 1)
        return self.pos_mean[idx], self.pos_std[idx]

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (tensors + JSON metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "std": self.std, "pos_mean": self.pos_mean, "pos_std": self.pos_std,
                   "pos_count": self.pos_count, "massive_dims": self.massive_dims,
                   "global": torch.tensor([self.global_mean, self.global_std], dtype=torch.float64)}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"vlhooks": "reference_stats/1", "meta": json.dumps(self.meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        """Read a file written by `save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FeatureError(
                f"Reference stats {str(path)!r} not found; make them with `vlhooks stats ... --out FILE`."
            )
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("vlhooks") != "reference_stats/1":
                raise FeatureError(f"{path} is not a vlhooks reference-stats file; make one with `vlhooks stats`.")
            t = {k: f.get_tensor(k) for k in f.keys()}
        g = t.pop("global")
        return cls(mean=t["mean"], std=t["std"], pos_mean=t["pos_mean"], pos_std=t["pos_std"],
                   pos_count=t["pos_count"], global_mean=float(g[0]), global_std=float(g[1]),
                   massive_dims=t["massive_dims"], meta=json.loads(md.get("meta", "{}")))


def reference_stats_from_sequences(sequences: Iterable[torch.Tensor], *, max_positions: int = 64,
                                   sink_ratio: float = 10.0, massive_ratio: float = 100.0,
                                   sink_positions: Sequence[int] | None = None, min_count: int = 2,
                                   meta: dict | None = None) -> ReferenceStats:
    """`ReferenceStats` from [L_i, D] hidden-state sequences, streamed in float64.

    Sinks are detected per sequence with `sink_ratio`, or, when `sink_positions` is given, exactly those indices
    (negative ones count from the end) are excluded instead.
    """
    P = int(max_positions)
    if P < 1:
        raise FeatureError("max_positions must be >= 1.")
    count = s1 = s2 = maxabs = None
    n_seq = n_sinks = 0
    for seq in sequences:
        x = seq.detach().double().cpu()  # [L, D]
        if x.ndim != 2 or x.shape[0] == 0:
            raise FeatureError(f"Each sequence must be [L, D] with L >= 1, got {tuple(x.shape)}.")
        L, D = x.shape
        if count is None:
            count, s1, s2 = torch.zeros(P, dtype=torch.float64), torch.zeros(P, D, dtype=torch.float64), \
                torch.zeros(P, D, dtype=torch.float64)
            maxabs = torch.zeros(D, dtype=torch.float64)
        elif D != s1.shape[1]:
            raise FeatureError(
                f"Sequence width {D} differs from the first sequence's {s1.shape[1]}; use one encoder layer."
            )
        if sink_positions is None:
            sinks = _sinks_row(x, torch.ones(L, dtype=torch.bool), sink_ratio)
        else:
            sinks = torch.zeros(L, dtype=torch.bool)
            for p in sink_positions:
                if -L <= p < L:
                    sinks[p] = True
        keep = ~sinks
        n_seq += 1
        n_sinks += int(sinks.sum())
        bucket = torch.arange(L).clamp_max(P - 1)[keep]  # [n]
        xc = x[keep]  # [n, D]
        count.index_add_(0, bucket, torch.ones(len(bucket), dtype=torch.float64))
        s1.index_add_(0, bucket, xc)
        s2.index_add_(0, bucket, xc * xc)
        if xc.shape[0]:
            maxabs = torch.maximum(maxabs, xc.abs().amax(0))
    if count is None or count.sum() == 0:
        raise FeatureError("No clean tokens to compute statistics from; pass non-empty prompts (or fewer sinks).")
    n = count.sum()
    mean = s1.sum(0) / n  # [D]
    var = (s2.sum(0) / n - mean ** 2).clamp_min(0)
    std = var.sqrt()
    massive = maxabs > massive_ratio * (s2.sum(0) / n).sqrt().median()  # [D]
    keep_d = ~massive
    ng = n * keep_d.sum()
    g_mean = s1.sum(0)[keep_d].sum() / ng
    g_std = (s2.sum(0)[keep_d].sum() / ng - g_mean ** 2).clamp_min(0).sqrt()
    c = count.clamp_min(1).unsqueeze(1)
    pos_mean = s1 / c
    pos_std = (s2 / c - pos_mean ** 2).clamp_min(0).sqrt()
    few = count < min_count
    pos_mean[few], pos_std[few] = mean, std
    info = dict(meta or {}, sequences=n_seq, tokens=int(n), sinks_excluded=n_sinks, sink_ratio=sink_ratio,
                sink_positions=list(sink_positions) if sink_positions is not None else None,
                massive_ratio=massive_ratio, max_positions=P, min_count=min_count)
    return ReferenceStats(mean=mean.float(), std=std.float(), pos_mean=pos_mean.float(), pos_std=pos_std.float(),
                          pos_count=count.long(), global_mean=float(g_mean), global_std=float(g_std),
                          massive_dims=massive.nonzero().flatten().long(), meta=info)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"Prompt file {str(path)!r} not found; pass a text file with one prompt per line.")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise FeatureError(f"Prompt file {str(path)!r} has no prompts; write one prompt per line.")
    return prompts


def text_encoder(model: torch.nn.Module, tokenizer: Any, *, layer: int = -1, max_length: int = 512,
                 chat_template: bool = False, enable_thinking: bool | None = None
                 ) -> Callable[[list[str]], list[torch.Tensor]]:
    """A function prompts -> [L_i, D] `hidden_states[layer]` per prompt (padding removed), for any transformers
    text model. `chat_template=True` wraps each prompt as a user turn with the generation prompt (as the Z-Image
    pipeline does; `enable_thinking` goes to the template)."""
    from .encoders._common import model_device_dtype, pick_layers

    def encode(prompts: list[str]) -> list[torch.Tensor]:
        texts = list(prompts)
        if chat_template:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=enable_thinking)
                     for p in texts]
        device, _ = model_device_dtype(model)
        groups = [texts] if tokenizer.pad_token is not None else [[t] for t in texts]
        side = getattr(tokenizer, "padding_side", "right")
        out: list[torch.Tensor] = []
        try:
            tokenizer.padding_side = "right"  # real tokens keep positions 0..L-1
            with torch.no_grad():
                for g in groups:
                    enc = tokenizer(g, padding=True, truncation=True, max_length=max_length,
                                    return_tensors="pt").to(device)
                    res = model(**enc, output_hidden_states=True, return_dict=True)
                    h = pick_layers(res.hidden_states, layer).float()  # [b, L, D]
                    m = enc["attention_mask"].bool()
                    out += [h[i][m[i]].cpu() for i in range(h.shape[0])]
        finally:
            tokenizer.padding_side = side
        return out

    return encode


def compute_reference_stats(prompts: Sequence[str] | str | os.PathLike,
                            encode: Callable[[list[str]], list[torch.Tensor]], *, batch_size: int = 16,
                            progress: bool = True, meta: dict | None = None, **kwargs) -> ReferenceStats:
    """Position-aware per-dimension statistics of an encoder layer over prompts (a list or a prompt file).

    `encode` maps a list of prompts to one [L_i, D] tensor each (e.g. `text_encoder(model, tokenizer, layer=-2)` or
    `MiniLMEncoder.sequences`). Keyword arguments go to `reference_stats_from_sequences` (thresholds,
    `max_positions`, `sink_positions`). Save the result with `.save(path)`.
    """
    from tqdm.auto import tqdm

    if isinstance(prompts, (str, os.PathLike)):
        meta = dict(meta or {}, prompt_file=str(prompts))
        prompts = read_prompts(prompts)
    prompts = list(prompts)
    if not prompts:
        raise FeatureError("No prompts; pass at least one prompt.")

    def seqs():
        for i in tqdm(range(0, len(prompts), batch_size), desc="reference stats", unit="batch",
                      disable=not progress):
            yield from encode(prompts[i:i + batch_size])

    return reference_stats_from_sequences(seqs(), meta=dict(meta or {}, prompts=len(prompts)), **kwargs)


# ------------------------------------------------------------------------------------------------ normalisation
@dataclass
class NormalizeConfig:
    """How to map VL tokens toward the caption space.

    mode: `"none"`; `"global"`: x * target_std / std(x[clean positions, non-massive dims]);
        `"per_dim"`: (x - mu_x[d]) / sigma_x[d] * sigma_ref[d] + mu_ref[d] with mu_x, sigma_x over clean positions
        (reference read per position bucket when `position_aware`);
        `"hybrid"`: hybrid_weight * per_dim + (1 - hybrid_weight) * global.
    target_std: global target (defaults to the reference's `global_std`).
    sink_ratio, massive_ratio: detection thresholds (module docstring).
    outliers: after the mapping, entries outside center +- outlier_sigma * scale are set to 0 (`"zero"`) or to the
        nearest bound (`"clamp"`); center/scale are the reference mean/std per dim for per_dim/hybrid, and the
        output's clean mean / std (scalars per row) for global/none.
    """

    mode: str = "global"
    target_std: float | None = None
    position_aware: bool = False
    hybrid_weight: float = 0.5
    sink_ratio: float = 10.0
    massive_ratio: float = 100.0
    outliers: str = "none"
    outlier_sigma: float = 6.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FeatureError(f"Unknown normalisation mode {self.mode!r}; use one of {', '.join(MODES)}.")
        if self.outliers not in OUTLIER_MODES:
            raise FeatureError(f"Unknown outlier mode {self.outliers!r}; use one of {', '.join(OUTLIER_MODES)}.")
        if not 0.0 <= self.hybrid_weight <= 1.0:
            raise FeatureError(f"hybrid_weight must be in [0, 1], got {self.hybrid_weight}.")
        if self.outlier_sigma <= 0:
            raise FeatureError(f"outlier_sigma must be > 0, got {self.outlier_sigma}.")

    def to_dict(self) -> dict:
        return asdict(self)


def handle_outliers(x: torch.Tensor, center: torch.Tensor | float, scale: torch.Tensor | float, mode: str,
                    sigma: float) -> torch.Tensor:
    """Entries of x outside [center - sigma*scale, center + sigma*scale] set to 0 (`zero`) or to the bound (`clamp`)."""
    if mode == "none":
        return x
    center = torch.as_tensor(center, dtype=x.dtype, device=x.device)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    lo, hi = center - sigma * scale, center + sigma * scale
    if mode == "zero":
        return torch.where((x < lo) | (x > hi), torch.zeros_like(x), x)
    if mode == "clamp":
        return torch.minimum(torch.maximum(x, lo.expand_as(x)), hi.expand_as(x))
    raise FeatureError(f"Unknown outlier mode {mode!r}; use one of {', '.join(OUTLIER_MODES)}.")


def _clean_std(x: torch.Tensor, clean: torch.Tensor, dims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std (scalars) of x[clean][:, dims]."""
    v = x[clean][:, dims].double()
    if v.numel() < 2:
        raise FeatureError("Too few clean entries for a std; lower the thresholds or pass more tokens.")
    return v.mean(), v.std(correction=0)


def match_global_std(tokens: torch.Tensor, target_std: float, mask: torch.Tensor | None = None, *,
                     sink_ratio: float = 10.0, massive_ratio: float = 100.0) -> torch.Tensor:
    """Scale each row so the std over its clean positions and non-massive dims equals `target_std`."""
    x, valid, flat = _rows(tokens, mask)
    out = x.clone()
    for b in range(x.shape[0]):
        sinks = _sinks_row(x[b], valid[b], sink_ratio)
        clean = valid[b] & ~sinks
        dims = ~_massive_row(x[b], clean, massive_ratio)
        _, s = _clean_std(x[b], clean, dims)
        out[b] = (x[b].double() * (target_std / s.clamp_min(1e-12))).to(x.dtype)
    return out[0] if flat else out


def match_per_dim(tokens: torch.Tensor, reference: ReferenceStats, mask: torch.Tensor | None = None, *,
                  position_aware: bool = False, sink_ratio: float = 10.0, eps: float = 1e-6) -> torch.Tensor:
    """Map each dim of each row to the reference mean/std (input stats over the row's clean positions)."""
    x, valid, flat = _rows(tokens, mask)
    if x.shape[-1] != reference.width:
        raise FeatureError(
            f"Tokens have width {x.shape[-1]} but the reference stats have {reference.width}; compute the stats "
            "with an encoder of the same width (or project the tokens first)."
        )
    out = x.clone()
    ref_mu, ref_sd = (t.to(x.device, torch.float64) for t in reference.at(x.shape[1], position_aware))  # [N, D]
    for b in range(x.shape[0]):
        clean = valid[b] & ~_sinks_row(x[b], valid[b], sink_ratio)
        xc = x[b][clean].double()  # [n, D]
        if xc.shape[0] < 2:
            raise FeatureError("per_dim matching needs at least 2 non-sink tokens per row; use mode='global'.")
        mu, sd = xc.mean(0), xc.std(0, correction=0).clamp_min(eps)  # [D]
        out[b] = ((x[b].double() - mu) / sd * ref_sd + ref_mu).to(x.dtype)
    return out[0] if flat else out


def normalize(features: VLFeatures | torch.Tensor, config: NormalizeConfig | None = None,
              reference: ReferenceStats | str | os.PathLike | None = None, **overrides: Any) -> VLFeatures:
    """Normalise features toward the caption space; returns new `VLFeatures` with `source["normalisation"]` set.

    `reference` (stats or a stats file) is needed for per_dim / hybrid, and for global without `target_std`.
    `overrides` replace fields of `config` (e.g. `normalize(f, mode="per_dim", reference=stats)`).
    """
    cfg = replace(config or NormalizeConfig(), **overrides)
    if isinstance(features, torch.Tensor):
        features = VLFeatures(features if features.ndim == 3 else features.unsqueeze(0))
    if isinstance(reference, (str, os.PathLike)):
        reference = ReferenceStats.load(reference)
    x, mask = features.tokens, features.mask
    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
    need_ref = cfg.mode in ("per_dim", "hybrid") or (cfg.mode == "global" and cfg.target_std is None)
    if need_ref and reference is None:
        raise FeatureError(
            f"Normalisation mode {cfg.mode!r} needs reference stats (`reference=` a file from `vlhooks stats`)"
            + (" or a `target_std`." if cfg.mode == "global" else ".")
        )
    target = cfg.target_std if cfg.target_std is not None else (reference.global_std if reference else None)
    sinks = find_sink_positions(x, valid, cfg.sink_ratio)  # [B, N]
    massive = find_massive_dims(x, valid, cfg.massive_ratio, sinks=sinks)  # [B, D]

    if cfg.mode == "none":
        y = x.clone()
    elif cfg.mode == "global":
        y = match_global_std(x, target, valid, sink_ratio=cfg.sink_ratio, massive_ratio=cfg.massive_ratio)
    else:
        y = match_per_dim(x, reference, valid, position_aware=cfg.position_aware, sink_ratio=cfg.sink_ratio,
                          eps=cfg.eps)
        if cfg.mode == "hybrid":
            g = match_global_std(x, target, valid, sink_ratio=cfg.sink_ratio, massive_ratio=cfg.massive_ratio)
            y = cfg.hybrid_weight * y + (1.0 - cfg.hybrid_weight) * g

    if cfg.outliers != "none":
        for b in range(y.shape[0]):
            if cfg.mode in ("per_dim", "hybrid"):
                center, scale = (t.to(y.device, y.dtype) for t in reference.at(y.shape[1], cfg.position_aware))
            else:
                clean = valid[b] & ~sinks[b]
                center, scale = _clean_std(y[b], clean, ~massive[b])
            yb = handle_outliers(y[b], center, scale, cfg.outliers, cfg.outlier_sigma)
            y[b] = torch.where(valid[b].unsqueeze(-1), yb, y[b])
    y = torch.where(valid.unsqueeze(-1), y, x)  # padded tokens untouched

    record = dict(cfg.to_dict(), target_std=target,
                  reference=(reference.meta.get("encoder") or reference.meta.get("model")) if reference else None,
                  sinks_per_row=[int(s) for s in sinks.sum(1)],
                  massive_dims=[m.nonzero().flatten().tolist() for m in massive])
    source = dict(features.source, normalisation=record)
    return VLFeatures(y, mask=mask, space=features.space, source=source)
