"""Did the sparsity buy latency? densify / weight_zero_fraction / sparsity_latency and the report's verdicts."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from lightning_eff.compression.pruning import (
    densify,
    prune,
    sparsity_latency,
    weight_zero_fraction,
)
from lightning_eff.compression.pruning.speed import (
    UnsupportedModelError,
    _shift_zero_points,
)
from lightning_eff.compression.quantization.engines import (
    model_engine,
    quantized_engine,
    supported_engines,
)
from lightning_eff.compression.quantization.fx import (
    calibrate,
    convert_fx_model,
    prepare_ptq_fx_model,
)
from lightning_eff.errors import ConfigError


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_zero_fraction_counts_weight_matrices_only():
    model = _cnn()
    with torch.no_grad():
        model[0].weight[:2].zero_()      # 2 of 8 filters: 54 of 216 weights
        model[0].bias.zero_()            # biases are not counted
        model[7].weight[:, :8].zero_()   # 80 of 160
    total = 216 + 8 * 16 * 9 + 160
    assert weight_zero_fraction(model) == pytest.approx((54 + 80) / total)


def test_densify_float_leaves_no_zero_and_the_input_alone():
    model = _cnn()
    prune(model, 0.75)
    assert weight_zero_fraction(model) == pytest.approx(0.75, abs=0.01)
    dense = densify(model)
    assert weight_zero_fraction(dense) == 0.0
    assert weight_zero_fraction(model) == pytest.approx(0.75, abs=0.01)  # the sparse model keeps its zeros
    for (name, a), (_, b) in zip(model.state_dict().items(), dense.state_dict().items()):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        changed = a != b
        assert torch.all(a[changed] == 0) and torch.all(b[changed] == 1e-3), name  # only the zeros moved
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max() < 0.05


def test_densify_torch_nn_utils_prune():
    layer = nn.Linear(8, 4)
    torch_prune.l1_unstructured(layer, "weight", 0.5)
    assert weight_zero_fraction(layer) == 0.5
    dense = densify(layer)
    assert weight_zero_fraction(dense) == 0.0 and weight_zero_fraction(layer) == 0.5


@pytest.mark.parametrize("engine", [e for e in ("x86", "qnnpack") if e in supported_engines()])
def test_densify_int8_moves_zero_points_and_keeps_the_engine(engine):
    model = _cnn()
    prune(model, 0.75)
    x = torch.randn(1, 3, 8, 8)
    prepared = prepare_ptq_fx_model(model, x, engine=engine, observer="minmax")
    calibrate(prepared, [torch.randn(8, 3, 8, 8) for _ in range(2)])
    int8 = convert_fx_model(prepared)
    assert weight_zero_fraction(int8) == pytest.approx(0.75, abs=0.01)  # int8 weights keep the pruned zeros
    dense = densify(int8)
    assert weight_zero_fraction(dense) == 0.0 and model_engine(dense) == engine
    assert weight_zero_fraction(int8) == pytest.approx(0.75, abs=0.01)
    with quantized_engine(engine), torch.no_grad():
        assert (int8(x) - dense(x)).abs().max() < 0.1  # one integer step per former zero
    probe = sparsity_latency(int8, x, repeats=1)
    assert probe["engine"] == engine and probe["backend"] == f"int8 {engine}"


def test_shift_zero_points_reference_values():
    """Entries at the zero point move one step up (one step down at the top of the range); others stay."""
    per_tensor = torch._make_per_tensor_quantized_tensor(torch.tensor([[3, 5, 127, 3]], dtype=torch.int8), 0.1, 3)
    assert _shift_zero_points(per_tensor).int_repr().tolist() == [[4, 5, 127, 4]]
    top = torch._make_per_tensor_quantized_tensor(torch.tensor([[127, 0]], dtype=torch.int8), 0.1, 127)
    assert _shift_zero_points(top).int_repr().tolist() == [[126, 0]]
    ints = torch.tensor([[0, 1, 0], [2, 2, 5]], dtype=torch.int8)
    per_channel = torch._make_per_channel_quantized_tensor(ints, torch.tensor([0.1, 0.2], dtype=torch.float64),
                                                           torch.tensor([0, 2]), 0)
    shifted = _shift_zero_points(per_channel)
    assert shifted.int_repr().tolist() == [[1, 1, 1], [3, 3, 5]]
    assert shifted.q_per_channel_scales().tolist() == [0.1, 0.2] and shifted.q_per_channel_axis() == 0


class _ZeroAware(nn.Module):
    """A kernel that really skips zeros: sleeps 4 ms unless its weight has zeros (decision logic check)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 4))

    def forward(self, x):
        if not bool((self.weight == 0).any()):
            time.sleep(0.004)
        return x @ self.weight


def test_sparsity_latency_verdict_follows_the_measurement():
    fast_when_sparse = _ZeroAware()
    with torch.no_grad():
        fast_when_sparse.weight[0].zero_()
    probe = sparsity_latency(fast_when_sparse, torch.randn(1, 4), repeats=3)
    assert probe["bought_latency"] is True and probe["speedup"] > 2 and probe["zero_fraction"] == 0.25
    assert probe["engine"] == "fp32" and probe["backend"] == "fp32 eager CPU" and probe["dense_ms"] >= 4.0

    model = _cnn()
    prune(model, 0.9)
    probe = sparsity_latency(model, torch.randn(1, 3, 8, 8), repeats=3, margin=0.99)
    assert probe["bought_latency"] is False  # nothing is 100x faster: the margin decides, not the zeros
    assert probe["zero_fraction"] == pytest.approx(0.9, abs=0.01)


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="fill=0.0"):
        densify(_cnn(), fill=0.0)
    with pytest.raises(ConfigError, match="margin=1.5"):
        sparsity_latency(_cnn(), torch.randn(1, 3, 8, 8), margin=1.5)
    with pytest.raises(ConfigError, match="repeats=0"):
        sparsity_latency(_cnn(), torch.randn(1, 3, 8, 8), repeats=0)
    scripted = torch.jit.trace(_cnn(), torch.randn(1, 3, 8, 8))
    with pytest.raises(UnsupportedModelError, match="TorchScript"):
        densify(scripted)


def test_report_states_per_variant_whether_sparsity_bought_latency():
    from test_qat_executorch import Templates

    from lightning_eff.report import build_report

    class Task:
        pass

    task = Task()
    task.model = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    sparse = densify(task.model)  # a copy; then prune it
    prune(sparse, 0.8)

    class Offers:
        def deployable_models(self):
            return {"pruned": sparse}

    dm = Templates(n=64, n_train=32)
    report = build_report(task, dm, [Offers()], {"batch_sizes": [1], "memory": False, "repeats": 2})
    assert "sparsity_speedup" not in report["rows"]["fp32"]  # dense: no verdict
    row = report["rows"]["pruned"]
    assert row["weight_zero_fraction"] == pytest.approx(0.8, abs=0.01) and isinstance(row["sparsity_bought_latency"], bool)
    (sentence,) = report["sparsity"]
    assert sentence.startswith("pruned (fp32 eager CPU): 80% zero weights")
    assert ("bought NO latency" in sentence) == (not row["sparsity_bought_latency"])
    off = build_report(task, dm, [Offers()], {"batch_sizes": [1], "memory": False, "repeats": 1, "sparsity_probe": False})
    assert off["sparsity"] == [] and "sparsity_speedup" not in off["rows"]["pruned"]
    with pytest.raises(ConfigError, match="report.sparsity_probe_min=2"):
        build_report(task, dm, [], {"sparsity_probe_min": 2})
