"""The speed paths of the injection processors against the general path they replace, and their parts against
independent references.

- Joint mode with nothing to gate: Flux double blocks append the extra K/V inside the block's own text/image
  concatenation; Flux single blocks and Z-Image write their own K/V into `[1, L + N]` buffers. Each must equal the
  general path (`attend_with_extras`' concatenation) exactly.
- The extras' text path reuses the block's captured modulation and a per-generation cache of its pre-norm: the
  outputs must equal recomputing both, bit for bit.
"""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

import vlhooks as vh
import vlhooks.models.flux as flux_mod
import vlhooks.models.z_image as z_mod
from vlhooks.attention import linear_into
from vlhooks.injector import Injector
from tiny import build, caption_width, inputs, output


def _run(family, cfg=None, batch=1, n=5, mask=False):
    torch.manual_seed(3)
    model = build(family)
    kw = inputs(family, batch=batch)
    tokens = torch.randn(1, n, caption_width(family))
    m = None
    if mask:
        m = torch.ones(1, n, dtype=torch.bool)
        m[0, -2:] = False
    with torch.no_grad(), vh.inject(model, vh.VLFeatures(tokens, mask=m), cfg or vh.InjectionConfig()):
        return output(model, kw)


def _general_only(monkeypatch):
    """Force the general path (`attend_with_extras` with its concatenation) everywhere."""
    for mod in (flux_mod, z_mod):
        monkeypatch.setattr(mod, "plain_joint", lambda *a, **k: False)
    monkeypatch.setattr(flux_mod, "appendable", lambda *a, **k: False)


@pytest.mark.parametrize("family", ["flux", "z_image"])
def test_joint_fast_paths_equal_general_path(family, monkeypatch):
    fast = _run(family)
    _general_only(monkeypatch)
    general = _run(family)
    assert torch.equal(fast, general)


@pytest.mark.parametrize("family", ["flux", "z_image"])
def test_fast_paths_used_only_when_nothing_to_gate(family, monkeypatch):
    """Batch 2, a padded feature mask, a strength below 1: the general path, and the same numbers as before."""
    cases = [dict(batch=2), dict(mask=True), dict(cfg=vh.InjectionConfig(scale=0.5))]
    fast = [_run(family, **c) for c in cases]
    _general_only(monkeypatch)
    for c, f in zip(cases, fast):
        assert torch.equal(f, _run(family, **c)), c


@pytest.mark.parametrize("family", ["flux", "z_image", "sd3"])
@pytest.mark.parametrize("mode", ["joint", "decoupled"])
def test_captured_modulation_and_cached_norm_equal_recomputing(family, mode, monkeypatch):
    cfg = vh.InjectionConfig(mode=mode)
    fast = _run(family, cfg, batch=2)
    block_call = Injector.block_call

    def recomputing(self, site, args, kwargs):  # no cached pre-norm handed over: the family computes it
        call = block_call(self, site, args, kwargs)
        if call is not None:
            call.pre_normed = None
        return call

    monkeypatch.setattr(Injector, "block_call", recomputing)
    for fam in vh.models.base._FAMILIES:  # no modulation recorded: the family computes it from the block's input
        monkeypatch.setattr(type(fam), "modulation_module", lambda self, tf, site: None)
    assert torch.equal(fast, _run(family, cfg, batch=2))


def test_flux_rope_into_and_identity_rows_are_exact():
    torch.manual_seed(0)
    x = torch.randn(1, 7, 2, 8)
    cos, sin = torch.randn(7, 8), torch.randn(7, 8)
    out = torch.empty(1, 7, 2, 8)
    flux_mod._rope_into(out, x, (cos, sin))
    assert torch.equal(out, apply_rotary_emb(x, (cos, sin), sequence_dim=1))

    class _E:
        scratch = {}

    ext = flux_mod._with_identity_rows((cos, sin), 3, _E)
    xe = torch.randn(1, 10, 2, 8)
    rot = apply_rotary_emb(xe, ext, sequence_dim=1)
    assert torch.equal(rot[:, 7:], xe[:, 7:])  # the identity rows leave the extra keys as they are
    assert torch.equal(rot[:, :7], apply_rotary_emb(xe[:, :7], (cos, sin), sequence_dim=1))
    assert flux_mod._with_identity_rows((cos, sin), 3, _E) is ext  # built once per forward call


@pytest.mark.parametrize("bias", [False, True])
@torch.no_grad()
def test_linear_into_equals_linear(bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 12, bias=bias)
    x = torch.randn(1, 9, 16)
    buf = torch.empty(1, 11, 12)
    assert linear_into(buf[:, :9], x, lin)
    assert torch.equal(buf[:, :9], lin(x))
    assert not linear_into(buf[:, :9], x, torch.nn.Sequential(lin))  # only plain nn.Linear
    with torch.enable_grad():
        assert not linear_into(buf[:, :9], x, lin)  # out= has no autograd: training takes the general path


@pytest.mark.parametrize("family", ["flux", "z_image"])
def test_progress_read_to_the_host_only_where_a_strength_depends_on_it(family, monkeypatch):
    """Reading the timestep to the host is a device sync: with the whole window and a constant schedule nothing
    depends on it, so it is not read; a schedule that reads it and is 1 at every step gives the same output, bit
    for bit."""
    reads = []
    real = Injector.begin_forward

    def spy(self, args, kwargs, context_name):
        fam = self.family
        orig = fam.read_progress_list
        fam.read_progress_list = lambda a, k: reads.append(1) or orig(a, k)
        try:
            return real(self, args, kwargs, context_name)
        finally:
            del fam.read_progress_list

    monkeypatch.setattr(Injector, "begin_forward", spy)
    full = _run(family)
    assert reads == []
    always_one = vh.InjectionConfig(schedule="linear_decay", schedule_params={"end": 1.0})  # 1 + 0 u: factor 1
    assert torch.equal(_run(family, always_one), full)
    assert len(reads) == 1
    assert not torch.equal(_run(family, vh.InjectionConfig(window=(0.0, 0.2))), full)  # outside the window: off


@pytest.mark.parametrize("family", ["flux", "z_image"])
def test_rows_in_a_run_take_a_view_of_the_bank(family, monkeypatch):
    """Two feature rows, the second switched off: the first row of the bank serves as a slice, with no
    host-to-device index copy per block; row 0 gets its features (as when every row has them), row 1 none."""
    import vlhooks.injector as inj

    torch.manual_seed(3)
    model = build(family)
    kw = inputs(family, batch=2)
    t = torch.randn(2, 5, caption_width(family))
    cfg = vh.InjectionConfig(guidance="none")
    with torch.no_grad():
        plain = output(model, kw)
        with vh.inject(model, vh.VLFeatures(t[[0, 0]]), cfg):
            every = output(model, kw)
        monkeypatch.setattr(inj, "_device_index", lambda *a: pytest.fail("an index copy for a run of rows"))
        with vh.inject(model, vh.VLFeatures(t), cfg) as h:
            h.set_features(vh.VLFeatures(t), active=[True, False])
            some = output(model, kw)
    assert torch.equal(some[1], plain[1])
    torch.testing.assert_close(some[0], every[0], rtol=0, atol=1e-5)
    assert (some[0] - plain[0]).abs().max() > 1e-3
