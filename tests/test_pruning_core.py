"""Pruning functional core: masks against hand-computed references, schedules against formulas, bad inputs."""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn

from lightning_eff.callbacks.pruning import Pruning
from lightning_eff.compression.pruning import (
    GradientStats,
    compute_masks,
    erk_densities,
    get_parameter,
    layer_sparsities,
    nm_mask,
    prune,
    regrow,
    rigl_update,
    saliency_scores,
    select_parameters,
    set_update,
)
from lightning_eff.compression.pruning.regrowth import drop_fraction
from lightning_eff.errors import ConfigError, NoEffectWarning
from lightning_eff.schedules import (
    check_sparsity_schedule,
    constant_sparsity,
    polynomial_decay,
    rounds_sparsity,
)

torch.set_num_threads(1)

W = torch.tensor([[0.1, -0.9, 0.3, 0.0], [1.0, 0.2, -0.05, 0.7]])


def _int(mask):
    return mask.int().tolist()


# ------------------------------------------------------------------ saliency x granularity
def test_magnitude_unstructured_hand_computed():
    m = compute_masks({"w": saliency_scores(W, "l1")}, 0.5, "unstructured", "uniform")["w"]
    # the four smallest |w|: 0.0, 0.05, 0.1, 0.2
    assert _int(m) == [[0, 1, 1, 0], [1, 0, 0, 1]]
    m2 = compute_masks({"w": saliency_scores(W, "l2")}, 0.5, "unstructured", "uniform")["w"]
    assert torch.equal(m, m2)  # element-wise, L1 and L2 give the same order


def test_channel_l1_vs_l2_hand_computed():
    w = torch.tensor([[3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # L1 norms 3 < 4: row 0 goes; L2 norms 3 > 2: row 1 goes.
    l1 = compute_masks({"w": saliency_scores(w, "l1")}, 0.5, "channel", "uniform")["w"]
    l2 = compute_masks({"w": saliency_scores(w, "l2")}, 0.5, "channel", "uniform")["w"]
    assert _int(l1) == [[0, 0, 0, 0], [1, 1, 1, 1]]
    assert _int(l2) == [[1, 1, 1, 1], [0, 0, 0, 0]]


def test_channel_granularity_on_conv_filters():
    w = torch.zeros(4, 2, 3, 3)
    for i, v in enumerate([0.5, 2.0, 0.1, 1.0]):
        w[i] = v
    m = compute_masks({"c": w.abs()}, 0.5, "channel", "uniform")["c"]
    assert [bool(m[i].all()) for i in range(4)] == [False, True, False, True]
    assert all(bool(m[i].all()) or not bool(m[i].any()) for i in range(4))  # whole filters


def test_block_granularity_hand_computed():
    # 1x2 blocks: means row0 (0.5, 0.15), row1 (0.6, 0.375): the 0.15 and 0.375 blocks go.
    m = compute_masks({"w": W.abs()}, 0.5, "block", "uniform", block=[1, 2])["w"]
    assert _int(m) == [[1, 1, 0, 0], [1, 1, 0, 0]]
    # 2x2 blocks: means 0.55 and 0.2625 -> the right block goes.
    m = compute_masks({"w": W.abs()}, 0.5, "block", "uniform", block=[2, 2])["w"]
    assert _int(m) == [[1, 1, 0, 0], [1, 1, 0, 0]]
    # partial edge blocks (3 columns, block 1x2): [a b | c] the edge block's mean is c alone
    w = torch.tensor([[1.0, 1.0, 0.9]])
    m = compute_masks({"w": w}, 0.34, "block", "uniform", block=[1, 2])["w"]  # 1.02 elements
    assert _int(m) == [[1, 1, 0]]


def test_taylor_saliency_hand_computed():
    w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    stats = GradientStats("taylor")
    for g in ([4.0, 1.0, 0.1, 1.0], [4.0, 1.0, 0.1, 1.0]):
        w.grad = torch.tensor(g)
        stats.update({"w": w})
    scores = stats.scores("w", w)
    assert torch.allclose(scores, torch.tensor([4.0, 2.0, 0.3, 4.0]))
    assert _int(compute_masks({"w": scores}, 0.5, "unstructured", "uniform")["w"]) == [1, 0, 0, 1]


def test_obd_saliency_hand_computed():
    w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    stats = GradientStats("obd")
    for g in ([3.0, 1.0, 1.0, 0.1], [-3.0, 1.0, -1.0, 0.1]):
        w.grad = torch.tensor(g)
        stats.update({"w": w})
    scores = stats.scores("w", w)
    # Fisher = mean g^2 = [9, 1, 1, 0.01]; 1/2 F w^2 = [4.5, 2, 4.5, 0.08]
    assert torch.allclose(scores, torch.tensor([4.5, 2.0, 4.5, 0.08]))
    assert _int(compute_masks({"w": scores}, 0.5, "unstructured", "uniform")["w"]) == [1, 0, 1, 0]
    # magnitude would have pruned the two smallest weights instead
    assert _int(compute_masks({"w": w.detach().abs()}, 0.5, "unstructured", "uniform")["w"]) == [0, 0, 1, 1]


def test_gradient_saliency_needs_statistics():
    with pytest.raises(ConfigError, match="taylor"):
        saliency_scores(torch.ones(3), "taylor")
    with pytest.raises(ConfigError, match=r"saliency='l3' is not supported; choose one of \['l1', 'l2', 'taylor', 'obd'\]"):
        saliency_scores(torch.ones(3), "l3")


# ------------------------------------------------------------------ N:M
def test_nm_linear_hand_computed():
    assert _int(nm_mask(W.abs(), 2, 4)) == [[0, 1, 1, 0], [1, 0, 0, 1]]


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_exact_on_conv(n, m):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    mask = compute_masks({"c": w.abs()}, 1 - n / m, "nm", n=n, m=m)["c"]
    groups = mask.movedim(1, -1).reshape(-1, m)  # input channels are the grouped axis
    assert torch.all(groups.sum(dim=1) == n)
    # the kept ones are the n largest of each group
    vals = w.abs().movedim(1, -1).reshape(-1, m)
    kept_min = vals.masked_fill(~groups, float("inf")).min(dim=1).values
    pruned_max = vals.masked_fill(groups, float("-inf")).max(dim=1).values
    assert torch.all(kept_min >= pruned_max)


def test_nm_incompatible_layers_stay_dense_with_warning():
    with pytest.warns(NoEffectWarning, match="dw"):
        masks = compute_masks({"dw": torch.rand(8, 1, 3, 3), "ok": torch.rand(4, 8)}, 0.5, "nm")
    assert bool(masks["dw"].all()) and int(masks["ok"].sum()) == 16


# ------------------------------------------------------------------ distribution
def test_global_vs_uniform_distribution():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    uni = compute_masks(scores, 0.5, "unstructured", "uniform")
    assert _int(uni["a"]) == [0, 0, 1, 1] and _int(uni["b"]) == [0, 0, 1, 1]
    glob = compute_masks(scores, 0.5, "unstructured", "global")
    # one ranking: all of a would go, but every layer keeps its best weight (min_keep=1)
    assert _int(glob["a"]) == [0, 0, 0, 1] and _int(glob["b"]) == [1, 1, 1, 1]
    exact = compute_masks(scores, 0.5, "unstructured", "global", min_keep=0)
    assert _int(exact["a"]) == [0, 0, 0, 0]


def test_erk_hand_computed():
    shapes = {"a": (16, 3, 3, 3), "b": (256, 256)}
    dens = erk_densities(shapes, 0.2)
    # raw_a = 25/432 would give density > 1 -> dense; b takes the rest of the budget.
    budget = 0.2 * (432 + 65536) - 432
    assert dens["a"] == 1.0
    assert math.isclose(dens["b"], budget / 65536, rel_tol=1e-9)
    sp = layer_sparsities(shapes, 0.8, "erk")
    total = sum((1 - sp[k]) * math.prod(s) for k, s in shapes.items())
    assert math.isclose(total, 0.2 * (432 + 65536), rel_tol=1e-9)


def test_previous_masks_are_kept():
    s = torch.tensor([5.0, 1.0, 4.0, 3.0])
    prev = torch.tensor([True, True, False, True])
    m = compute_masks({"w": s}, 0.5, "unstructured", "uniform", previous={"w": prev})["w"]
    assert _int(m) == [1, 0, 0, 1]


# ------------------------------------------------------------------ regrowth
def test_rigl_and_set_keep_sparsity():
    w = torch.tensor([0.5, -0.1, 0.0, 0.0, 0.9])
    mask = w != 0
    g = torch.tensor([0.0, 0.0, 3.0, 0.1, 0.0])
    assert _int(rigl_update(w, mask, g, 1)) == [1, 0, 1, 0, 1]
    gen = torch.Generator().manual_seed(0)
    out = set_update(w, mask, 1, gen)
    assert int(out.sum()) == 3 and not bool(out[1])
    torch.manual_seed(0)
    weights = {"a": torch.randn(64)}
    masks = {"a": torch.rand(64) > 0.7}
    for method in ("rigl", "set"):
        new = regrow(method, weights, masks, 0.3, step=5, grads={"a": torch.randn(64)})
        assert int(new["a"].sum()) == int(masks["a"].sum())
        assert not torch.equal(new["a"], masks["a"])
    a = regrow("set", weights, masks, 0.3, step=5)
    b = regrow("set", weights, masks, 0.3, step=5)
    assert torch.equal(a["a"], b["a"])  # seeded by step: same on every rank and after resume
    assert drop_fraction(0, 0.3, 0, 100) == pytest.approx(0.3) and drop_fraction(50, 0.3, 0, 100) == pytest.approx(0.15)


# ------------------------------------------------------------------ schedules
def test_polynomial_schedule_matches_formula():
    si, sf, t0, t1, p = 0.1, 0.8, 10, 110, 3.0
    for t in range(0, 130, 7):
        expected = 0.0 if t < t0 else sf + (si - sf) * (1 - (min(t, t1) - t0) / (t1 - t0)) ** p
        assert polynomial_decay(t, si, sf, t0, t1, p, 1) == pytest.approx(expected)
    # frequency: the value only changes every 10 steps after t0
    assert polynomial_decay(25, si, sf, t0, t1, p, 10) == polynomial_decay(20, si, sf, t0, t1, p, 10)
    assert polynomial_decay(110, si, sf, t0, t1, p, 7) == pytest.approx(sf)


def test_rounds_and_constant_schedules():
    assert [rounds_sparsity(t, 0.875, 3, 0, 90) for t in (0, 29, 30, 60, 200)] == pytest.approx([0.5, 0.5, 0.75, 0.875, 0.875])
    assert constant_sparsity(4, 0.6, begin_step=5) == 0.0 and constant_sparsity(5, 0.6, begin_step=5) == 0.6


def test_callback_schedule_is_pure_function_of_step():
    cb = Pruning(amount=0.75, schedule="polynomial", frequency=10)
    begin, end = cb.config.steps(total_steps=100)
    assert (begin, end) == (0, 75)
    assert cb.config.target(40, begin, end) == cb.config.target(40, begin, end)
    assert cb.config.target(80, begin, end) == 0.75


# ------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("amount, match", [(1.5, r"amount=1.5 is out of range"), (-0.1, r"amount=-0.1 is out of range"),
                                           ("0.5", r"amount='0.5' must be a number"), (1.0, r"amount=1.0.*allow_full=True")])
def test_bad_amount(amount, match):
    with pytest.raises(ConfigError, match=match):
        Pruning(amount=amount)


def test_full_sparsity_needs_allow_full():
    Pruning(amount=1.0, allow_full=True, schedule="constant")
    with pytest.raises(ConfigError, match="final_sparsity=1.0"):
        polynomial_decay(5, 0.0, 1.0, 0, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(initial_amount=0.8, amount=0.5), r"decreasing schedule: initial_amount=0.8 > amount=0.5"),
        (dict(schedule="steps", schedule_steps=[100, 200], schedule_amounts=[0.5, 0.3]), r"decreases at step 200"),
        (dict(schedule="steps", schedule_steps=[100, 200], schedule_amounts=[0.5, 1.2]), r"step 200.*out of range"),
        (dict(schedule="steps"), r"schedule_steps"),
        (dict(schedule="polynomal"), r"schedule='polynomal'.*Did you mean 'polynomial'"),
        (dict(saliency="tailor"), r"Did you mean 'taylor'"),
        (dict(granularity="unstructred"), r"Did you mean 'unstructured'"),
        (dict(distribution="erk2"), r"distribution='erk2'"),
        (dict(granularity="nm", amount=0.75, schedule="constant"), r"1 - n/m = 0.5"),
        (dict(granularity="nm", n=4, m=4, schedule="constant"), r"n=4"),
        (dict(block=[0, 4]), r"block\[0\]=0"),
        (dict(frequency=0), r"frequency=0"),
        (dict(regrowth="rigl"), r"schedule='constant'"),
        (dict(regrowth="sett", schedule="constant"), r"Did you mean 'set'"),
        (dict(end_step=5, begin_step=10), r"end_step=5 must come after begin_step=10"),
        (dict(include=["(unclosed"]), r"not a valid regular expression"),
        (dict(export_sparse="int4"), r"export_sparse='int4'"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Pruning(**kwargs)


def test_decreasing_schedule_names_step():
    with pytest.raises(ConfigError, match="decreases at step 30"):
        check_sparsity_schedule([10, 20, 30], [0.2, 0.5, 0.4])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2, bias=False)


def test_module_without_parameter_is_named():
    net = _Net()
    with pytest.raises(ConfigError, match=r"'act' \(ReLU, prunable parameters \[\]\)"):
        select_parameters(net, include=["act"])
    with pytest.raises(ConfigError, match=r"'fc' \(Linear, prunable parameters \['weight'\]\)"):
        select_parameters(net, include=["fc"], parameter_names=["bias"])
    with pytest.raises(ConfigError, match=r"module 'fc' \(Linear\) has no parameter 'bias'; its prunable parameters are \['weight'\]"):
        get_parameter(net, "fc.bias")
    with pytest.raises(ConfigError, match=r"module 'act' \(ReLU\) has no parameter 'weight'"):
        get_parameter(net, "act.weight")


def test_selector_matching_nothing_warns_naming_it():
    with pytest.warns(NoEffectWarning, match=re.escape("include pattern 'blocks\\..*' matches no module")):
        select_parameters(_Net(), include=[r"blocks\..*", "conv"])
    with pytest.warns(NoEffectWarning, match="Conv2D"):
        select_parameters(_Net(), module_types=["Conv2D"])


def test_selection_skips_thin_and_first_layers():
    net = _Net()
    assert list(select_parameters(net)) == ["conv.weight", "fc.weight"]
    assert list(select_parameters(net, skip_first=True)) == ["fc.weight"]
    assert list(select_parameters(net, min_params=10)) == ["conv.weight"]
    assert list(select_parameters(net, exclude=["conv"])) == ["fc.weight"]


def test_one_shot_prune_exact_global_sparsity():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    masks = prune(net, 0.75)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == 32 * 64 + 64 * 10 - int(0.75 * (32 * 64 + 64 * 10))
    for name, m in masks.items():
        assert bool((dict(net.named_parameters())[name][~m] == 0).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune(nn.Sequential(nn.Linear(8, 8)), 0.5, granularity="nm")
