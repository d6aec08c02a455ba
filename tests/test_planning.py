"""Row and strength planning without a model: guidance layouts, feature rows, windows, dropped rows, same_graph.

The expected plans are written out by hand from the rules in `vlhooks/planning.py`'s docstrings."""

import pytest
import torch

import vlhooks as vh
from vlhooks import planning as P


def test_guidance_layouts():
    # explicit layouts win; "none" never splits
    assert P.guidance_layout("cond_first", None, False, 4, 1) == "cond_first"
    assert P.guidance_layout("uncond_first", "cond_first", True, 4, 1) == "uncond_first"
    assert P.guidance_layout("none", "cond_first", True, 4, 1) is None
    # auto: the family layout, only when the pipeline guides and the halves fit the feature batch
    assert P.guidance_layout("auto", "uncond_first", True, 4, 2) == "uncond_first"
    assert P.guidance_layout("auto", "uncond_first", False, 4, 2) is None
    assert P.guidance_layout("auto", "uncond_first", True, 3, 1) is None  # odd batch: no halves
    assert P.guidance_layout("auto", "uncond_first", True, 4, 4) is None  # 4 feature rows cannot cover halves of 2
    assert P.guidance_layout("auto", None, True, 4, 1) is None  # a family with separate guidance calls


def test_row_roles():
    assert P.row_roles(4, None) == ["c", "c", "c", "c"]
    assert P.row_roles(4, "cond_first") == ["c", "c", "u", "u"]
    assert P.row_roles(4, "uncond_first") == ["u", "u", "c", "c"]
    assert P.row_roles(3, None, context_name="uncond") == ["u", "u", "u"]  # Flux true CFG's uncond call
    with pytest.raises(vh.FeatureError, match="even model batch"):
        P.row_roles(3, "cond_first")


def test_feature_rows_broadcast_repeat_and_refuse():
    assert [P.feature_row(k, 4, 1) for k in range(4)] == [0, 0, 0, 0]
    assert [P.feature_row(k, 4, 4) for k in range(4)] == [0, 1, 2, 3]
    assert [P.feature_row(k, 6, 2) for k in range(6)] == [0, 0, 0, 1, 1, 1]  # 3 images per prompt
    with pytest.raises(vh.FeatureError, match="divisor of 4"):
        P.feature_row(0, 4, 3)


def test_assign_rows_cond_uncond_negative_and_dropped():
    # [uncond, uncond, cond, cond], 2 positive rows, no negative: only the conditional rows
    a = P.assign_rows(["u", "u", "c", "c"], n_pos=2, n_neg=0, active=None, same_graph=False)
    assert (a.rows, a.feature_rows, a.off) == ([2, 3], [0, 1], frozenset())
    # with 1 negative row (bank index 2 = after the 2 positive rows), broadcast to both unconditional rows
    a = P.assign_rows(["u", "u", "c", "c"], n_pos=2, n_neg=1, active=None, same_graph=False)
    assert (a.rows, a.feature_rows) == ([0, 1, 2, 3], [2, 2, 0, 1])
    # feature row 1 dropped (image dropout): its model row leaves the plan ...
    a = P.assign_rows(["c", "c", "c"], n_pos=3, n_neg=0, active=[True, False, True], same_graph=False)
    assert (a.rows, a.feature_rows, a.off) == ([0, 2], [0, 2], frozenset())
    # ... or stays at strength 0 under same_graph
    a = P.assign_rows(["c", "c", "c"], n_pos=3, n_neg=0, active=[True, False, True], same_graph=True)
    assert (a.rows, a.feature_rows, a.off) == ([0, 1, 2], [0, 1, 2], frozenset({1}))


def test_plan_call_windows_and_strengths():
    a = P.assign_rows(["c", "c"], 1, 0, None, False)
    plan = P.plan_call(a, [0.5, 0.25], batch=2, same_graph=False)
    assert plan == P.ReferencePlan(rows=None, feature_rows=[0, 0], strengths=[0.5, 0.25])  # every row: rows None
    # a row outside the window (strength 0) leaves the plan; none left: no plan at all
    assert P.plan_call(a, [0.0, 0.25], 2, False) == P.ReferencePlan([1], [0], [0.25])
    assert P.plan_call(a, [0.0, 0.0], 2, False) is None
    # same_graph keeps it, at strength 0
    assert P.plan_call(a, [0.0, 0.25], 2, True) == P.ReferencePlan(None, [0, 0], [0.0, 0.25])
    # a dropped row is at strength 0 whatever its schedule
    a = P.assign_rows(["c", "c"], 2, 0, [False, True], True)
    assert P.plan_call(a, [1.0, 1.0], 2, True) == P.ReferencePlan(None, [0, 1], [0.0, 1.0])


def test_plan_from_an_injection_config_window():
    """The eager plan of a call at progress p is `config.strength_at(p)` per row, read through a window."""
    cfg = vh.InjectionConfig(window=(0.2, 0.6), schedule="linear_decay")
    a = P.assign_rows(["u", "c"], 1, 0, None, False)
    inside = P.plan_call(a, [cfg.strength_at(0.4)] * 2, 2, False)
    assert inside == P.ReferencePlan([1], [0], [pytest.approx(0.5)])  # u = (0.4 - 0.2) / 0.4 = 0.5 -> 1 - u
    assert P.plan_call(a, [cfg.strength_at(0.7)] * 2, 2, False) is None  # outside the window


def test_plan_call_tensor_under_compile():
    a = P.assign_rows(["c", "c", "c"], 3, 0, [True, False, True], True)
    full = P.plan_call_tensor(a, None, 3)  # nothing to gate: Python floats, the dropped row at 0
    assert full == P.ReferencePlan(None, [0, 1, 2], [1.0, 0.0, 1.0])
    plan = P.plan_call_tensor(a, torch.tensor([0.5]), 3)  # one progress for the batch
    assert plan.rows is None and torch.equal(plan.strengths, torch.tensor([0.5, 0.0, 0.5]))
    b = P.assign_rows(["u", "c"], 1, 0, None, False)
    plan = P.plan_call_tensor(b, torch.tensor([0.3, 0.7]), 2)
    assert plan.rows == [1] and torch.equal(plan.strengths, torch.tensor([0.7]))


def test_block_strengths_apply_the_block_scale():
    assert P.block_strengths(P.ReferencePlan(None, [0], [0.5, 1.0]), 2.0) == [1.0, 2.0]
    t = P.block_strengths(P.ReferencePlan(None, [0], torch.tensor([0.5, 1.0])), 2.0)
    assert torch.equal(t, torch.tensor([1.0, 2.0]))


def test_merge_references_aligns_them_to_the_union_of_their_rows():
    assert P.merge({0: None, 1: None}, 2) is None
    one = P.ReferencePlan([1], [0], [0.5])
    assert P.merge({0: None, 3: one}, 2) == P.CallPlan([1], ((3, one),))  # one reference: its plan unchanged
    a = P.ReferencePlan([0, 2], [0, 1], [0.5, 1.0])  # reference 0 on rows 0 and 2
    b = P.ReferencePlan([2, 3], [0, 0], [0.25, 0.75])  # reference 1 on rows 2 and 3
    merged = P.merge({0: a, 1: b}, 4)
    assert merged.rows == [0, 2, 3]
    assert merged.parts == ((0, P.ReferencePlan([0, 2, 3], [0, 1, 0], [0.5, 1.0, 0.0])),
                            (1, P.ReferencePlan([0, 2, 3], [0, 0, 0], [0.0, 0.25, 0.75])))
    full = P.merge({0: P.ReferencePlan(None, [0, 0], [1.0, 1.0]), 1: P.ReferencePlan([1], [0], [0.5])}, 2)
    assert full.rows is None and full.parts[1][1].strengths == [0.0, 0.5]
    t = P.merge({0: P.ReferencePlan([0], [0], torch.tensor([0.5])), 1: P.ReferencePlan([1], [0], torch.tensor([2.0]))}, 2)
    assert torch.equal(t.parts[0][1].strengths, torch.tensor([0.5, 0.0]))
    assert torch.equal(t.parts[1][1].strengths, torch.tensor([0.0, 2.0]))
