"""Exact resumes: two successive resumes equal a straight run bit for bit (weights, EMA, the rows of every step,
the epoch counter), for checkpoints written at an epoch's last batch, mid-epoch, at an epoch's end, with EMA and
gradient accumulation. In one process, on the tiny recipe (seconds).

The bug these pin down: resuming from a checkpoint written at an epoch's last batch, Lightning closes that epoch
but never counts the next one as started, so its epoch counter lags the global step by one from then on; the
sampler's epoch came from that counter, so a second resume repeated an epoch's permutation (0.015 away from a
straight run after 20 + 20 + 20 steps), and every resume left the saved `epoch` one further behind. Mid-epoch
checkpoints restarted the epoch's rows from its first batch.
"""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from vlhooks.train.checkpoint_io import SafetensorsCheckpointIO, canonical_progress, load_checkpoint_file
from vlhooks.train.data import EpochSeededSampler, PairsDataModule
from vlhooks.train.module import AdapterModule

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "configs/tiny/lora.yaml").read_text())


class Record(L.Callback):
    """The rows (labels) and Lightning's epoch at every step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append((trainer.global_step, trainer.current_epoch, batch["label"].tolist()))


def _fit(tmp, cache, steps, *, limit, batch_size, every, resume=False, ema=None, accumulate=1):
    L.seed_everything(0)
    model = dict(TINY["model"], lr=1e-2, ema_decay=ema)
    module = AdapterModule(**model)
    data = dict(TINY["data"], limit=limit, batch_size=batch_size, cache_dir=str(cache))
    ckpt = ModelCheckpoint(dirpath=str(tmp / "lightning"), save_last=True, save_top_k=0,
                           every_n_train_steps=every)
    rec = Record()
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[rec, ckpt], plugins=[SafetensorsCheckpointIO()], accumulate_grad_batches=accumulate,
              default_root_dir=str(tmp)).fit(module, PairsDataModule(**data), ckpt_path="last" if resume else None)
    state = {k: v.clone() for k, v in module.adapter.trainable_state_dict().items()}
    saved = load_checkpoint_file(tmp / "lightning" / "last.ckpt")
    return state, module.ema, rec.steps, saved


CASES = {  # name: (limit, batch size, every_n_train_steps (None: at each epoch's end), ema, accumulate)
    "last-batch": (4, 4, 2, None, 1),  # one batch per epoch: every checkpoint at an epoch's last batch
    "mid-epoch": (6, 2, 2, None, 1),  # three batches per epoch: checkpoints inside epochs
    "epoch-end": (4, 2, None, None, 1),  # written at each epoch's end
    "stopped-mid-epoch": (6, 2, None, None, 1),  # max_steps ends runs mid-epoch (Lightning counts it complete)
    "ema-accumulate": (6, 2, 1, 0.9, 2),  # two steps per epoch, the second of one batch; EMA
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_successive_resumes_equal_a_straight_run(tmp_path, case):
    limit, bs, every, ema, acc = CASES[case]
    kw = dict(limit=limit, batch_size=bs, every=every, ema=ema, accumulate=acc)
    cache = tmp_path / "cache"
    w, e, steps, saved = _fit(tmp_path / "straight", cache, 6, **kw)
    _fit(tmp_path / "resumed", cache, 2, **kw)
    _, _, first, saved2 = _fit(tmp_path / "resumed", cache, 4, resume=True, **kw)
    w2, e2, second, saved3 = _fit(tmp_path / "resumed", cache, 6, resume=True, **kw)
    assert w.keys() == w2.keys() and all(torch.equal(w[k], w2[k]) for k in w), case
    if ema:
        assert all(torch.equal(a, b) for a, b in zip(e, e2))
    assert first + second == [r for r in steps if r[0] >= 2], "the same rows and epoch at every step"
    assert saved2["global_step"] == 4 and saved3["epoch"] == saved["epoch"]
    assert _counters(saved3) == _counters(saved)


def _counters(checkpoint):
    fit = checkpoint["loops"]["fit_loop"]
    return fit["epoch_progress"], fit["epoch_loop.batch_progress"], fit["epoch_loop.state_dict"]


def test_sampler_skips_into_the_epoch_and_shards_like_lightning():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    pos = [(0, 0)]
    s = EpochSeededSampler(10, seed=3, batch_size=2, position=lambda: pos[0])
    full = list(s)
    pos[0] = (0, 2)  # two batches of epoch 0 done: the rest of it
    assert list(s) == full[4:]
    pos[0] = (1, 0)
    assert list(s) == EpochSeededSampler(10, seed=4).epoch_order(0)  # epoch e: the seed + e permutation
    for n in (4, 5):  # what Lightning's wrapper around a one-process sampler gives each rank
        ranks = [list(EpochSeededSampler(n, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
        assert ranks == [list(DistributedSamplerWrapper(EpochSeededSampler(n, seed=0), num_replicas=2, rank=r,
                                                        shuffle=False)) for r in (0, 1)]


def test_canonical_progress_leaves_unknown_shapes_alone():
    assert not canonical_progress({"global_step": 3}, 2)
    ckpt = {"global_step": 3, "loops": {"fit_loop": {
        "epoch_progress": {"total": dict(ready=2, started=2, processed=1, completed=1), "current": {}},
        "epoch_loop.batch_progress": {"total": dict(ready=3, started=3, processed=2, completed=2), "current": {}},
        "epoch_loop.state_dict": {}}}}
    assert not canonical_progress(ckpt, 2)  # a batch started but not processed: not a state vlhooks writes
