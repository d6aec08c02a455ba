"""CPU: one training batch of the toy recipes' cache, three ways, side by side in one run (interleaved repeats):
the columns as nested lists (cache format 1), as `datasets.Array{n}D` (format 2, read through `datasets`), and
format 2 read into memory once (`ColumnsInMemory`, what `PairsDataModule.train_dataloader` uses up to 2 GiB).

    .venv/bin/python benchmarks/data_loader.py      # needs the projection recipe's cache (vlhooks train builds it)
"""

from __future__ import annotations

import statistics
import time

import torch
import yaml
from torch.utils.data import DataLoader

import vlhooks.train.data as D


def _list_of(ndim: int, dtype: str):
    """A nested-list feature of `ndim` levels (what format 1 stored)."""
    import datasets

    f = datasets.Value(dtype)
    for _ in range(ndim):
        f = datasets.List(f)
    return f


def per_batch_ms(dataset, batches: int = 20) -> float:
    it = iter(DataLoader(dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)))
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t0) / batches * 1e3


if __name__ == "__main__":
    import datasets

    cfg = yaml.safe_load(open("configs/toy/projection.yaml"))["data"]
    dm = D.PairsDataModule(**cfg)
    dm.prepare_data()
    dm.setup()
    arrays = dm.dataset
    raw = datasets.load_from_disk(str(dm.cache_path()))
    lists = raw.cast(datasets.Features({k: (v if not hasattr(v, "shape") else
                                             _list_of(len(v.shape), v.dtype)) for k, v in raw.features.items()}))
    lists = lists.with_format("torch")
    memory = D.ColumnsInMemory(arrays)
    rows = {"nested lists (format 1)": [], "Array{n}D via datasets (format 2)": [], "in memory (ColumnsInMemory)": []}
    for _ in range(5):
        for name, ds in zip(rows, (lists, arrays, memory)):
            rows[name].append(per_batch_ms(ds))
    base = rows["nested lists (format 1)"]
    print("| loader | ms per batch of 32: median [min-max] (5 repeats) | ratio to nested lists: median [min-max] |")
    print("|---|---|---|")
    for name, t in rows.items():
        r = [a / b for a, b in zip(t, base)]
        print(f"| {name} | {statistics.median(t):.1f} [{min(t):.1f}-{max(t):.1f}] | "
              f"{statistics.median(r):.3f} [{min(r):.3f}-{max(r):.3f}] |")
