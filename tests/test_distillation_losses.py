"""Distillation losses against hand-written references (survey eq. 4/5, FitNets, DistilBERT, AT, attention KL)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_eff import ConfigError
from lightning_eff.learning.distillation import (
    attention_kl_loss,
    attention_map,
    attention_transfer_loss,
    distillation_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    kd_loss,
    make_projection,
    soft_targets,
    task_loss,
)
from lightning_eff.schedules import ScheduledValue


def _reference_kd(s, t, T):
    """Hand-written T² · Σ p_t (log p_t − log p_s), mean over the batch, in float64."""
    s, t = s.double(), t.double()
    p_t = [[math.exp(v / T) for v in row] for row in t.tolist()]
    p_t = [[v / sum(row) for v in row] for row in p_t]
    total = 0.0
    for row_s, row_pt in zip(s.tolist(), p_t):
        z = math.log(sum(math.exp(v / T) for v in row_s))
        log_ps = [v / T - z for v in row_s]
        total += sum(pt * (math.log(pt) - lps) for pt, lps in zip(row_pt, log_ps))
    return T * T * total / s.shape[0]


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
def test_kd_loss_matches_hand_written_reference(T):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    assert kd_loss(s, t, T).item() == pytest.approx(_reference_kd(s, t, T), rel=1e-5, abs=1e-6)


def test_soft_targets_are_equation_4():
    t = torch.tensor([[1.0, 2.0, 3.0]])
    expected = torch.tensor([math.exp(x / 2) for x in (1, 2, 3)])
    assert torch.allclose(soft_targets(t, 2.0)[0], expected / expected.sum())


def test_kd_loss_non_negative_and_zero_for_equal_logits():
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        s, t = torch.randn(8, 10, generator=g) * 5, torch.randn(8, 10, generator=g) * 5
        assert kd_loss(s, t, 3.0).item() >= 0.0
    x = torch.randn(8, 10, generator=g)
    assert kd_loss(x, x.clone(), 4.0).item() == 0.0


def test_t_squared_keeps_gradient_scale():
    """Without T² the soft-target gradient shrinks as 1/T²; with it, the scale stays put (Hinton et al.)."""
    g = torch.Generator().manual_seed(3)
    s0, t = torch.randn(64, 10, generator=g) * 0.1, torch.randn(64, 10, generator=g) * 0.1  # small logits: high-T regime
    norms = {}
    for T in (4.0, 8.0):
        s = s0.clone().requires_grad_(True)
        kd_loss(s, t, T).backward()
        norms[T] = s.grad.norm().item()
        # analytic gradient of T²·KL: T·(p_s − p_t)/B
        expected = T * (torch.softmax(s0 / T, -1) - torch.softmax(t / T, -1)) / 64
        assert torch.allclose(s.grad, expected, atol=1e-7)
    # high-T limit: p_s − p_t ≈ (z_s − z_t)/(C·T), so T·(p_s − p_t) does not depend on T ...
    assert norms[8.0] / norms[4.0] == pytest.approx(1.0, rel=0.02)
    # ... while the plain KL's gradient (without T²) drops by (8/4)² = 4x
    assert (norms[8.0] / 64) / (norms[4.0] / 16) == pytest.approx(0.25, rel=0.02)


def test_distillation_loss_is_equation_5():
    g = torch.Generator().manual_seed(4)
    s, t, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    out = distillation_loss(s, t, y, temperature=3.0, task_weight=0.25, kd_weight=0.75)
    assert out["task"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert out["kd"].item() == pytest.approx(_reference_kd(s, t, 3.0), rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.25 * out["task"].item() + 0.75 * out["kd"].item(), rel=1e-6)
    assert distillation_loss(s, t, None, 3.0)["task"].item() == 0.0


def test_soft_labels_task_loss_matches_cross_entropy():
    g = torch.Generator().manual_seed(5)
    s, y = torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g)
    assert task_loss(s, F.one_hot(y, 3).float()).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    mixed = 0.7 * F.one_hot(y, 3).float() + 0.3 * F.one_hot((y + 1) % 3, 3).float()
    assert task_loss(s, mixed).item() == pytest.approx(F.cross_entropy(s, mixed).item(), rel=1e-6)


@pytest.mark.parametrize("T", [0.0, -1.0, float("inf"), "2"])
def test_bad_temperature_refused(T):
    with pytest.raises(ConfigError, match="temperature"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), T)


@pytest.mark.parametrize("w", [-0.1, 1.5])
def test_weights_outside_unit_interval_refused(w):
    with pytest.raises(ConfigError, match="kd_weight"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, 2.0, 0.5, w)


def test_shape_mismatches_name_both_shapes():
    with pytest.raises(ConfigError, match=r"class-count mismatch.*\(4, 10\).*\(4, 5\)"):
        kd_loss(torch.zeros(4, 10), torch.zeros(4, 5))
    with pytest.raises(ConfigError, match=r"batch-size mismatch.*\(4, 10\).*\(1, 10\)"):
        kd_loss(torch.zeros(4, 10), torch.zeros(1, 10))  # upstream kl_div would broadcast silently


def test_hidden_losses_against_references():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    per_pos = ((s - t) ** 2).mean(-1)
    assert hidden_mse_loss(s, t, mask=mask).item() == pytest.approx((per_pos * mask).sum().item() / 8, rel=1e-6)
    cos = F.cosine_similarity(s, t, dim=-1)
    assert hidden_cosine_loss(s, t, mask=mask).item() == pytest.approx(((1 - cos) * mask).sum().item() / 8, rel=1e-5)
    assert hidden_cosine_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_projection_maps_student_width_to_teacher_width_and_trains():
    s, t = torch.randn(3, 4, 16), torch.randn(3, 4, 32)
    proj = make_projection(s, t, "mse")
    assert isinstance(proj, torch.nn.Linear) and proj.out_features == 32
    loss = hidden_mse_loss(s, t, proj)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    conv = make_projection(torch.randn(2, 8, 4, 4), torch.randn(2, 24, 4, 4), "cosine")
    assert isinstance(conv, torch.nn.Conv2d) and conv.out_channels == 24
    assert make_projection(s, torch.randn(3, 4, 16), "mse") is None
    with pytest.raises(ConfigError, match="width 16 != teacher width 32"):
        hidden_mse_loss(s, t)


def test_attention_transfer_reference():
    g = torch.Generator().manual_seed(7)
    fs, ft = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    qs = fs.pow(2).mean(1).flatten(1)
    qt = ft.pow(2).mean(1).flatten(1)
    ref = (qs / qs.norm(dim=1, keepdim=True) - qt / qt.norm(dim=1, keepdim=True)).norm(dim=1).mean()
    assert attention_transfer_loss(fs, ft).item() == pytest.approx(ref.item(), rel=1e-5)
    assert attention_map(fs).norm(dim=1).allclose(torch.ones(2))
    # different resolutions: the larger map is pooled to the smaller
    assert attention_transfer_loss(torch.randn(2, 3, 8, 8), ft).item() >= 0.0


def test_attention_kl_reference_and_zero_when_equal():
    g = torch.Generator().manual_seed(8)
    a = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1)
    b = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), -1)
    ref = (b * (b.log() - a.log())).sum(-1).mean()
    assert attention_kl_loss(a, b).item() == pytest.approx(ref.item(), rel=1e-5)
    assert attention_kl_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    # different head counts: averaged over heads
    assert attention_kl_loss(a, b[:, :2]).item() >= 0.0


def test_scheduled_value_ramps_and_validates():
    from lightning_eff.learning.distillation import check_temperature

    t = ScheduledValue("temperature", {"start": 8.0, "end": 2.0, "begin_step": 10, "end_step": 20}, check_temperature)
    assert [t(s) for s in (0, 10, 15, 20, 99)] == [8.0, 8.0, 5.0, 2.0, 2.0]
    with pytest.raises(ConfigError, match=r"temperature.end"):
        ScheduledValue("temperature", {"start": 8.0, "end": 0.0}, check_temperature)
    with pytest.raises(ConfigError, match="unknown"):
        ScheduledValue("temperature", {"start": 8.0, "end": 2.0, "stop": 3}, check_temperature)
