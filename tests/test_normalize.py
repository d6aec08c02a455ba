"""Normalisation toward the caption space: each result checked against a numpy formula written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from vlhooks.errors import FeatureError
from vlhooks.features import VLFeatures
from vlhooks.normalize import (NormalizeConfig, ReferenceStats, compute_reference_stats, find_massive_dims,
                               find_sink_positions, handle_outliers, match_global_std, match_per_dim, normalize,
                               reference_stats_from_sequences, text_encoder)

D = 12


def vl_tokens(seed: int = 0, n: int = 40, sink_rows=(0,), massive_dim: int = 5) -> np.ndarray:
    """[n, D] normal tokens with attention sinks (whole rows with huge values in two dims) and one massive dim
    (a +400 offset on every token: large everywhere, so no single token stands out by its norm)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 2.0, (n, D))
    x[:, massive_dim] += 400.0
    for r in sink_rows:
        x[r, 1] = 8000.0
        x[r, 7] = -6000.0
    return x


def clean_std(x: np.ndarray, rows, dims) -> float:
    return float(x[np.ix_(rows, dims)].std())  # numpy's default: population std


def test_detects_sinks_and_massive_dims():
    x = vl_tokens()
    t = torch.tensor(x)
    assert find_sink_positions(t).nonzero().flatten().tolist() == [0]
    assert find_massive_dims(t).nonzero().flatten().tolist() == [5]
    # a batch with a mask: the padded row is never a sink
    b = torch.stack([t, t * 0 + 1.0])
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    s = find_sink_positions(b, mask)
    assert s[0].nonzero().flatten().tolist() == [0] and not bool(s[1].any())


def test_global_std_on_clean_positions_and_dims():
    x = vl_tokens(seed=1, sink_rows=(0, 1))
    rows, dims = list(range(2, 40)), [d for d in range(D) if d != 5]
    target = 7.5
    y = match_global_std(torch.tensor(x), target).numpy()
    assert clean_std(y, rows, dims) == pytest.approx(target, rel=1e-9)
    np.testing.assert_allclose(y, x * target / clean_std(x, rows, dims), rtol=1e-12)  # one scale for everything
    # the exclusions matter: with sinks or the massive dim counted, the scale would be far off
    assert clean_std(x, list(range(40)), dims) > 10 * clean_std(x, rows, dims)
    assert clean_std(x, rows, list(range(D))) > 10 * clean_std(x, rows, dims)


def test_global_std_thresholds_are_configurable():
    x = vl_tokens(seed=2)
    t = torch.tensor(x)
    # with huge thresholds nothing is excluded: the std of the whole tensor matches the target
    y = match_global_std(t, 1.0, sink_ratio=1e9, massive_ratio=1e9).numpy()
    assert float(y.std()) == pytest.approx(1.0, rel=1e-9)


def test_global_std_per_batch_row_with_mask():
    x0, x1 = vl_tokens(seed=3), vl_tokens(seed=4) * 3.0
    t = torch.tensor(np.stack([x0, x1]))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 35:] = False
    f = normalize(VLFeatures(t.float(), mask=mask), mode="global", target_std=2.0)
    y = f.tokens.double().numpy()
    dims = [d for d in range(D) if d != 5]
    assert clean_std(y[0], list(range(1, 40)), dims) == pytest.approx(2.0, rel=1e-5)
    assert clean_std(y[1], list(range(1, 35)), dims) == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_array_equal(y[1, 35:], t[1, 35:].float().double().numpy())  # padding untouched
    rec = f.source["normalisation"]
    assert rec["mode"] == "global" and rec["target_std"] == 2.0 and rec["sinks_per_row"] == [1, 1]
    assert rec["massive_dims"] == [[5], [5]]


def ref_stats(seed: int = 5, P: int = 4) -> ReferenceStats:
    rng = np.random.default_rng(seed)
    mean, std = rng.normal(0, 3, D), rng.uniform(0.5, 4, D)
    pm, ps = rng.normal(0, 3, (P, D)), rng.uniform(0.5, 4, (P, D))
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return ReferenceStats(mean=f(mean), std=f(std), pos_mean=f(pm), pos_std=f(ps), pos_count=torch.full((P,), 10),
                          global_mean=0.1, global_std=2.5, massive_dims=torch.zeros(0, dtype=torch.long),
                          meta={"encoder": "test"})


def test_per_dim_gives_reference_mean_and_std():
    x = vl_tokens(seed=6)
    ref = ref_stats()
    y = match_per_dim(torch.tensor(x), ref).numpy()
    rows = list(range(1, 40))  # the sink row is left out of the statistics
    np.testing.assert_allclose(y[rows].mean(0), ref.mean.double().numpy(), atol=1e-5)
    np.testing.assert_allclose(y[rows].std(0), ref.std.double().numpy(), rtol=1e-5)


def test_per_dim_position_aware_formula():
    x = vl_tokens(seed=7, n=9)
    ref = ref_stats(P=4)
    y = match_per_dim(torch.tensor(x), ref, position_aware=True).numpy()
    rows = list(range(1, 9))
    mu, sd = x[rows].mean(0), x[rows].std(0)
    pm, ps = ref.pos_mean.double().numpy(), ref.pos_std.double().numpy()
    for i in range(9):
        p = min(i, 3)  # token i reads bucket min(i, P-1)
        np.testing.assert_allclose(y[i], (x[i] - mu) / sd * ps[p] + pm[p], rtol=1e-5, atol=1e-5)


def test_hybrid_is_the_weighted_mix():
    x = vl_tokens(seed=8)
    ref = ref_stats()
    w = 0.3
    y = normalize(torch.tensor(x).float(), mode="hybrid", reference=ref, hybrid_weight=w).tokens[0].double().numpy()
    xf = torch.tensor(x).float().double().numpy()
    rows, dims = list(range(1, 40)), [d for d in range(D) if d != 5]
    per_dim = (xf - xf[rows].mean(0)) / xf[rows].std(0) * ref.std.double().numpy() + ref.mean.double().numpy()
    glob = xf * ref.global_std / clean_std(xf, rows, dims)
    np.testing.assert_allclose(y, w * per_dim + (1 - w) * glob, rtol=1e-4, atol=1e-3)


def test_outliers_zero_and_clamp():
    x = torch.tensor([[0.0, 5.0, -7.0, 2.9], [3.1, -3.1, 100.0, 1.0]])
    center, scale, k = torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 0.5]), 3.0
    z = handle_outliers(x, center, scale, "zero", k)
    c = handle_outliers(x, center, scale, "clamp", k)
    # bounds per dim: [-3, 3], [-3, 3], [-3, 3], [-0.5, 2.5]
    assert z.tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    assert c.tolist() == [[0.0, 3.0, -3.0, 2.5], [3.0, -3.0, 3.0, 1.0]]
    assert torch.equal(handle_outliers(x, center, scale, "none", k), x)


def test_outliers_after_global_and_per_dim():
    x = torch.tensor(vl_tokens(seed=9)).float()
    k = 4.0
    g = normalize(x, mode="global", target_std=1.0, outliers="clamp", outlier_sigma=k).tokens[0].double().numpy()
    plain = normalize(x, mode="global", target_std=1.0).tokens[0].double().numpy()
    rows, dims = list(range(1, 40)), [d for d in range(D) if d != 5]
    mu = plain[np.ix_(rows, dims)].mean()
    inside = np.abs(plain - mu) <= k * 1.0
    np.testing.assert_allclose(g[inside], plain[inside], rtol=1e-6)  # in-range entries unchanged
    np.testing.assert_allclose(g[~inside], np.clip(plain[~inside], mu - k, mu + k), rtol=1e-5)
    assert (~inside).sum() >= 5  # the sink entries and the massive peaks were hit
    ref = ref_stats()
    z = normalize(x, mode="per_dim", reference=ref, outliers="zero", outlier_sigma=k).tokens[0].double().numpy()
    p = normalize(x, mode="per_dim", reference=ref).tokens[0].double().numpy()
    out = np.abs(p - ref.mean.double().numpy()) > k * ref.std.double().numpy()
    assert out.any() and (z[out] == 0).all()
    np.testing.assert_array_equal(z[~out], p[~out])


def test_normalize_errors_name_the_fix():
    x = torch.randn(1, 5, D)
    with pytest.raises(FeatureError, match="vlhooks stats"):
        normalize(x, mode="per_dim")
    with pytest.raises(FeatureError, match="target_std"):
        normalize(x, mode="global")
    with pytest.raises(FeatureError, match="same width"):
        normalize(torch.randn(1, 5, D + 1), mode="per_dim", reference=ref_stats())
    with pytest.raises(FeatureError, match="use one of"):
        NormalizeConfig(mode="adain")
    with pytest.raises(FeatureError, match="use one of"):
        NormalizeConfig(outliers="drop")


# ------------------------------------------------------------------------------------------------ reference stats
def sequences(n_seq: int = 6, seed: int = 10):
    """Prompts' hidden states: sink at position 0 (huge in two dims), varied lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_seq):
        x = rng.normal(1.0, 1.5, (5 + i, D))
        x[0, 2], x[0, 9] = 4000.0, -3000.0
        out.append(x)
    return out


def test_stats_exclude_sink_positions():
    seqs = sequences()
    st = reference_stats_from_sequences([torch.tensor(s) for s in seqs], max_positions=4)
    body = np.concatenate([s[1:] for s in seqs])  # every non-sink row
    np.testing.assert_allclose(st.mean.numpy(), body.mean(0), rtol=1e-5)
    np.testing.assert_allclose(st.std.numpy(), body.std(0), rtol=1e-5)
    everything = np.concatenate(seqs)
    assert abs(everything.mean(0)[2] - body.mean(0)[2]) > 100  # a sink row would have changed the result
    assert st.global_std == pytest.approx(float(body.std()), rel=1e-6)  # no massive dims once sinks are out
    assert st.massive_dims.numel() == 0 and st.meta["sinks_excluded"] == len(seqs)
    # position-aware: buckets 1, 2, and 3 = every position >= 3; bucket 0 held only sinks -> pooled values
    assert st.pos_count.tolist() == [0, 6, 6, sum(len(s) - 3 for s in seqs)]
    for p in (1, 2):
        np.testing.assert_allclose(st.pos_mean[p].numpy(), np.stack([s[p] for s in seqs]).mean(0), rtol=1e-5)
        np.testing.assert_allclose(st.pos_std[p].numpy(), np.stack([s[p] for s in seqs]).std(0), rtol=1e-5)
    tail = np.concatenate([s[3:] for s in seqs])
    np.testing.assert_allclose(st.pos_mean[3].numpy(), tail.mean(0), rtol=1e-5)
    np.testing.assert_allclose(st.pos_mean[0].numpy(), body.mean(0), rtol=1e-5)


def test_stats_explicit_sink_positions_and_massive_dims():
    rng = np.random.default_rng(11)
    seqs = [rng.normal(0, 1, (6, D)) for _ in range(4)]
    for s in seqs:
        s[2, 4] = 500.0  # a massive dim that is not a whole-token sink
    st = reference_stats_from_sequences([torch.tensor(s) for s in seqs], sink_positions=[0, -1], massive_ratio=50.0)
    body = np.concatenate([s[1:-1] for s in seqs])
    np.testing.assert_allclose(st.mean.numpy(), body.mean(0), rtol=1e-5, atol=1e-6)
    assert st.massive_dims.tolist() == [4]
    keep = [d for d in range(D) if d != 4]
    assert st.global_std == pytest.approx(float(body[:, keep].std()), rel=1e-6)


def test_stats_save_load_round_trip(tmp_path):
    st = reference_stats_from_sequences([torch.tensor(s) for s in sequences()], max_positions=3,
                                        meta={"encoder": "unit"})
    path = st.save(tmp_path / "s.safetensors")
    back = ReferenceStats.load(path)
    for name in ("mean", "std", "pos_mean", "pos_std", "pos_count", "massive_dims"):
        assert torch.equal(getattr(back, name), getattr(st, name))
    assert (back.global_mean, back.global_std, back.meta) == (st.global_mean, st.global_std, st.meta)
    with pytest.raises(FeatureError, match="vlhooks stats"):
        ReferenceStats.load(tmp_path / "missing.safetensors")


def tiny_bert(tmp_path):
    words = ["a", "cat", "dog", "red", "car", "on", "the", "sofa", "photo", "of", "blue", "sky"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizer(vocab_file=str(vocab))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64)).eval()
    return model, tok


def test_compute_reference_stats_from_prompt_file(tmp_path):
    model, tok = tiny_bert(tmp_path)
    prompts = ["a cat on the sofa", "a red car", "photo of a blue sky", "the dog", "a dog on a red sofa"]
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(prompts) + "\n\n")
    st = compute_reference_stats(pfile, text_encoder(model, tok, layer=1), batch_size=2, progress=False,
                                 sink_positions=[0], max_positions=8)
    rows = []
    with torch.no_grad():
        for p in prompts:  # one prompt at a time: no padding involved
            hs = model(**tok(p, return_tensors="pt"), output_hidden_states=True).hidden_states
            rows.append(hs[1][0, 1:].numpy())  # position 0 ([CLS]) excluded
    body = np.concatenate(rows).astype(np.float64)
    np.testing.assert_allclose(st.mean.numpy(), body.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.std.numpy(), body.std(0), rtol=1e-4, atol=1e-5)
    assert st.meta["prompts"] == 5 and st.meta["prompt_file"] == str(pfile)
