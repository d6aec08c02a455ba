"""Multi-process training through Lightning's strategies, on CPU (gloo): the real `vlhooks train` command with
`--trainer.strategy ddp|fsdp --trainer.devices 2 --trainer.accelerator cpu`; Lightning starts the second process.

A `Probe` callback (added on the command line, so it runs inside both ranks) records what each rank saw and
did: the rows of each batch, the first draws of its step generator, the files it created or replaced under the
run folder (through Python's audit hooks), and at the end its adapter weights and its whole DiT (gathered
under FSDP). The tests then check the run against that record.

FSDP on CPU: Lightning refuses `strategy='fsdp'` with `accelerator='cpu'` ("requires a GPU accelerator"), and
its FSDP strategy hands torch the device index, None on CPU, which torch's FSDP refuses ("needs a non-CPU
accelerator device"). Given `device_id=cpu`, torch's FSDP does run on CPU with gloo, so the FSDP runs here use
`CPUFSDP`: `vlhooks train`'s own FSDP strategy with that argument changed, and its checkpoints' optimizer state
gathered without `offload_to_cpu` (which torch implements for GPUs only; see `CPUFSDP`), passed as a class path.
Everything else (the wrap policy `vlhooks train` sets, the gathering of the adapter for exports, samples and
checkpoints, the safetensors checkpoint reader and writer) is the code a GPU run uses, and the parameters are sharded
for real across the two processes. On GPUs `--trainer.strategy fsdp` is all it takes (not run yet: no 2-GPU machine
was available).

FSDP gathers a unit's weights with a collective each time the unit runs, forward and backward, so both ranks must
run the same units in the same order every step. Each rank draws its own image drops: the runs here include a step
(step 3) in which every row of rank 0 drops its image and rank 1's do not, which is where FSDP used to hang: rank 0
skipped the extras (their embedding through the context refiner, and any backward through the DiT) while rank 1
gathered those units. Multi-process runs now keep such rows in the extras path at strength 0
(`Injector.same_graph`); `test_two_process_run` checks that the step is there.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from vlhooks.train.checkpoint_io import SafetensorsFSDPStrategy

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _watched(path, root: str) -> str | None:
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if not isinstance(path, (str, os.PathLike)):
        return None
    p = os.path.abspath(os.fspath(path))
    return p if p.startswith(root) else None


class Probe(L.Callback):
    """Runs in every rank; writes `<out>/rank<R>.json` and `<out>/rank<R>.safetensors`."""

    def __init__(self, out: str, watch: str):
        self.out, self.watch = Path(out), os.path.abspath(watch)
        self.rank, self.batches, self.draws, self.writes, self.info = None, [], [], [], {}
        sys.addaudithook(self._audit)
        atexit.register(self._dump)  # after the loggers' last writes

    def _audit(self, event, args):
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & (os.O_WRONLY | os.O_RDWR))
            hit = _watched(path, self.watch) if writing else None
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            hit = _watched(args[0], self.watch)
        elif event == "os.rename":
            hit = _watched(args[1], self.watch) or _watched(args[0], self.watch)
        else:
            return
        if hit:
            self.writes.append([event, os.path.relpath(hit, self.watch)])

    def setup(self, trainer, pl_module, stage):
        self.rank = trainer.global_rank
        self.info.update(world_size=trainer.world_size, strategy=type(trainer.strategy).__name__)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.info["sampler"] = type(trainer.train_dataloader.sampler).__name__
        self.batches.append([trainer.global_step, batch["label"].tolist()])
        self.draws.append([trainer.global_step, torch.rand(4, generator=pl_module._step_generator()).tolist()])

    def on_train_end(self, trainer, pl_module):
        from safetensors.torch import save_file
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = trainer.strategy.model
        gather = FSDP.summon_full_params(model, writeback=False) if isinstance(model, FSDP) else _null()
        with gather:  # a collective under FSDP: every rank is here
            tensors = {f"adapter.{k}": v.detach().clone().contiguous()
                       for k, v in pl_module.adapter.trainable_state_dict().items()}
            tensors.update({"dit." + n.replace("_fsdp_wrapped_module.", ""): p.detach().clone().contiguous()
                            for n, p in pl_module.dit.named_parameters()})
            self.info["fsdp_units"] = sum(isinstance(m, FSDP) for m in model.modules())
        self.out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.out / f"rank{self.rank}.safetensors"))

    def _dump(self):
        if self.rank is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.rank}.json").write_text(json.dumps(
            {"rank": self.rank, "batches": self.batches, "draws": self.draws, "writes": self.writes, **self.info}))


class CPUFSDP(SafetensorsFSDPStrategy):
    """`SafetensorsFSDPStrategy` wrapping with `device_id=cpu` (Lightning passes `root_device.index`, None on CPU),
    whose checkpoints gather the optimizer state without `offload_to_cpu`.

    Lightning gathers full state dicts with `offload_to_cpu=True`, which torch's FSDP implements for a GPU: on
    CPU its "copy to the CPU" returns the tensor itself, so the optimizer state's `exp_avg` and `exp_avg_sq` come
    back as views of one reused gather buffer (both holding the last state gathered, so a resume would be wrong),
    and a model's full state dict reads storage it has just freed (a segmentation fault; `vlhooks train` does not
    gather the model's, see `SafetensorsFSDPStrategy.lightning_module_state_dict`). On a GPU the copy is real."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP(model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)

    def optimizer_state(self, optimizer):
        """Lightning's `FSDPStrategy.optimizer_state` ("full" state dict type) with `offload_to_cpu=False`."""
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, OptimStateKeyType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _train(tmp, recipe, strategy, steps=STEPS, *extra):
    """`vlhooks train` on 2 CPU processes; returns (completed process, run folder, probe folder)."""
    run_name = yaml.safe_load((ROOT / recipe).read_text())["model"]["run_name"]
    if strategy == "fsdp":
        strategy = json.dumps({"class_path": "test_distributed.CPUFSDP"})
    run_dir, probe = tmp / "ckpt" / run_name, tmp / f"probe-{steps}-{len(extra)}"
    cb = json.dumps([{"class_path": "test_distributed.Probe", "init_args": {"out": str(probe), "watch": str(run_dir)}}])
    args = [sys.executable, "-m", "vlhooks", "train", "--config", str(ROOT / recipe), "--trainer.max_steps", str(steps),
            "--trainer.strategy", strategy, "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--data.batch_size", "2",  # 4 photos, 2 ranks: 2 rows per rank and step
            "--model.checkpoint_root", str(tmp / "ckpt"), "--data.cache_dir", str(tmp / "cache"),
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", cb, *extra]
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp, env=env)
    return r, run_dir, probe


def _probe(probe):
    from safetensors.torch import load_file

    return [(json.loads((probe / f"rank{r}.json").read_text()), load_file(str(probe / f"rank{r}.safetensors")))
            for r in (0, 1)]


def _recipe_model(recipe):
    return yaml.safe_load((ROOT / recipe).read_text())["model"]


@pytest.mark.parametrize("recipe", ["configs/tiny/lora.yaml", "configs/tiny/projection.yaml"])
def test_same_graph_runs_the_same_modules_and_switched_off_rows_add_nothing(recipe):
    """`Injector.same_graph` (set in multi-process runs): a step whose rows all dropped the image runs the same
    modules in the same order as one that injects (so FSDP gathers the same units), its loss equals the skipping
    path's, and backward reaches every adapter parameter with a zero gradient."""
    import vlhooks as vh
    from vlhooks.train.module import AdapterModule

    module = AdapterModule(**_recipe_model(recipe))
    dit, fam = module.dit, module.family
    handle = vh.apply_injection(dit, None, module.injection, adapter=module.adapter)
    g = torch.Generator().manual_seed(0)
    x, caption = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    sigma, feats = torch.tensor([0.3, 0.7]), vh.VLFeatures(torch.randn(2, 4, 16, generator=g))
    order: list[str] = []
    names = {m: n for n, m in dit.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda m, a: order.append(names[m])) for m in names]

    def run(active, same_graph):
        handle.injector.same_graph = same_graph
        handle.set_features(feats, active=active)
        order.clear()
        module.adapter.zero_grad(set_to_none=True)
        loss = fam.velocity(dit, x, sigma, caption).square().mean()
        if loss.requires_grad:
            loss.backward()
        return loss.detach(), list(order), [p.grad for p in module.adapter.trainable_parameters()]

    try:
        on, on_order, on_grads = run([True, True], True)
        off, off_order, off_grads = run([False, False], True)
        skip, skip_order, _ = run([False, False], False)
        half, _, _ = run([True, False], True)
        half_skip, _, _ = run([True, False], False)
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    assert off_order == on_order and len(skip_order) < len(on_order)
    assert any(g.abs().sum() > 0 for g in on_grads)
    assert all(g is not None and not g.any() for g in off_grads)
    torch.testing.assert_close(off, skip, atol=1e-6, rtol=0)
    torch.testing.assert_close(half, half_skip, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process run per (recipe, strategy), shared by the tests below."""
    done = {}

    def get(recipe, strategy):
        if (recipe, strategy) not in done:
            tmp = tmp_path_factory.mktemp(f"{Path(recipe).stem}-{strategy}")
            done[recipe, strategy] = (tmp, *_train(tmp, recipe, strategy))
        return done[recipe, strategy]

    return get


# lora: the extras' K/V through peft wrappers of the attention units' own to_k / to_v; projection: the adapter
# feeds the extras' embedding, so backward also runs through the context refiner's units.
CASES = [(f"configs/tiny/{adapter}.yaml", strategy) for strategy in ("ddp", "fsdp")
         for adapter in ("lora", "projection")]


def _dropped_all(info, model) -> list[bool]:
    """Per step: whether every row of this rank dropped its image (the step's first draws decide it)."""
    lo, hi = model["drop_image"] + model["drop_text"], model["drop_image"] + model["drop_text"] + model["drop_both"]
    return [all(u < model["drop_image"] or lo <= u < hi for u in d[:2]) for _, d in info["draws"]]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,strategy", CASES)
def test_two_process_run(runs, recipe, strategy):
    import vlhooks as vh
    from vlhooks.train.cli import fsdp_units
    from vlhooks.train.module import AdapterModule, build_dit

    tmp, r, run_dir, probe = runs(recipe, strategy)
    assert r.returncode == 0, r.stderr[-4000:]
    (info0, t0), (info1, t1) = _probe(probe)
    assert info0["world_size"] == info1["world_size"] == 2
    fresh = AdapterModule(**_recipe_model(recipe))
    if strategy == "fsdp":  # sharded for real: the policy's units and the root (adapter) unit
        assert info0["strategy"] == "CPUFSDP"
        assert info0["fsdp_units"] == len(fsdp_units(fresh)) + 1  # and the root

    # both ranks end with the same adapter, and it trained
    adapter_keys = [k for k in t0 if k.startswith("adapter.")]
    assert adapter_keys and all(torch.equal(t0[k], t1[k]) for k in adapter_keys)
    init = fresh.adapter.trainable_state_dict()
    assert any(not torch.equal(t0[f"adapter.{k}"], v) for k, v in init.items())

    # every DiT parameter is the recipe's seeded initialisation, on both ranks
    dit = build_dit(_recipe_model(recipe)["dit"])
    for n, p in dit.named_parameters():
        assert torch.equal(t0[f"dit.{n}"], p) and torch.equal(t1[f"dit.{n}"], p), n

    # data: EpochSeededSampler shards each epoch's permutation itself (as Lightning's DistributedSamplerWrapper
    # around it did; Lightning leaves a DistributedSampler in place); each step the ranks see disjoint halves of
    # the 4 photos
    assert info0["sampler"] == info1["sampler"] == "EpochSeededSampler"
    assert [s for s, _ in info0["batches"]] == list(range(STEPS))
    orders = []
    for (s, a), (_, b) in zip(info0["batches"], info1["batches"]):
        assert len(a) == len(b) == 2 and sorted(a + b) == [0, 1, 2, 3], (s, a, b)
        orders.append(a + b)
    assert len({tuple(o) for o in orders}) > 1, "a new permutation each epoch"

    # noise: rank 0 draws what a one-process run draws; rank 1 its own stream
    for (s, d0), (_, d1) in zip(info0["draws"], info1["draws"]):
        assert d0 == torch.rand(4, generator=torch.Generator().manual_seed(s)).tolist()
        assert d0 != d1
    # the run has a step in which one rank dropped every image and the other did not (FSDP's old hang)
    drops = list(zip(_dropped_all(info0, _recipe_model(recipe)), _dropped_all(info1, _recipe_model(recipe))))
    assert any(a != b for a, b in drops), drops

    # only rank 0 writes: checkpoints, adapter folders, samples, logs
    assert info1["writes"] == [], info1["writes"][:10]
    written = {w[1].split(os.sep)[0] for w in info0["writes"]}
    assert {"final", "lightning", "samples", "logs"} <= written, written
    assert len(list((run_dir / "logs").iterdir())) == 1
    assert len(list(run_dir.glob("wandb/offline-run-*"))) <= 1

    # the export is the trained adapter, loads, and inject applies it
    adapter = vh.load_adapter(run_dir / "final")
    from safetensors.torch import load_file

    exported = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert exported.keys() == {k.removeprefix("adapter.") for k in adapter_keys}
    assert all(torch.equal(v, t0[f"adapter.{k}"]) for k, v in exported.items())
    width = adapter.config.feature_width
    kw = dict(x=[torch.randn(3, 1, 16, 16)], t=torch.tensor([0.5]), cap_feats=[torch.randn(5, 16)], return_dict=False)
    feats = vh.VLFeatures(torch.randn(1, 16, width))
    with torch.no_grad():
        base = dit(**kw)[0][0]
        with vh.inject(dit, feats, adapter=adapter):
            out = dit(**kw)[0][0]
        with vh.inject(dit, feats):
            zero_shot = dit(**kw)[0][0]
    assert not torch.equal(out, base) and not torch.equal(out, zero_shot)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_resume_gives_the_same_adapter(runs, tmp_path, strategy):
    """2 steps, then `--ckpt_path last` to 4, equals 4 straight (the checkpoint holds the whole adapter and
    optimizer state even when FSDP had them sharded, and FSDP scatters them back on resume)."""
    recipe = "configs/tiny/lora.yaml"
    _, straight, _, probe = runs(recipe, strategy)
    assert straight.returncode == 0, straight.stderr[-4000:]
    r, _, _ = _train(tmp_path, recipe, strategy, STEPS // 2)
    assert r.returncode == 0, r.stderr[-4000:]
    r, _, resumed = _train(tmp_path, recipe, strategy, STEPS, "--ckpt_path", "last")
    assert r.returncode == 0 and "Restored all states" in r.stdout + r.stderr, r.stderr[-4000:]
    (_, a), _ = _probe(probe)
    (info, b), _ = _probe(resumed)
    assert [s for s, _ in info["batches"]] == list(range(STEPS // 2, STEPS))
    keys = [k for k in a if k.startswith("adapter.")]
    for k in keys:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
