"""Quantization numerics (survey Algorithms 2/3, STE eq. 3), observers, and agreement with torch."""
from __future__ import annotations

import io
import warnings

import pytest
import torch

from lightning_eff.compression.quantization.affine import (
    choose_qparams,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
)
from lightning_eff.compression.quantization.observers import (
    FakeQuantize,
    MinMaxObserver,
)
from lightning_eff.errors import ConfigError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.quantization import observer as ao_obs

torch.set_num_threads(1)


# ---------------------------------------------------------------- qrange / choose_qparams by hand
@pytest.mark.parametrize(
    "bits, signed, expected",
    [(8, False, (0, 255)), (8, True, (-128, 127)), (4, False, (0, 15)), (4, True, (-8, 7)), (2, False, (0, 3)), (2, True, (-2, 1))],
)
def test_qrange(bits, signed, expected):
    assert qrange(bits, signed) == expected


def test_algorithm2_hand_values_8bit_unsigned():
    scale, zp = choose_qparams(-1.0, 2.0, bits=8, signed=False)
    assert scale.item() == torch.tensor(3.0 / 255.0, dtype=torch.float32).item()
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert zp.item() == 85  # round(0 - (-1) / (3/255)) = round(85.0)
    x = torch.tensor([0.0, -1.0, 2.0, 3.0, -5.0, 1.0])
    q = quantize(x, scale, zp, bits=8, signed=False)
    assert q.tolist() == [85, 0, 255, 255, 0, 170]  # 0.0 -> zero point exactly; beyond range clamps
    assert dequantize(torch.tensor([85]), scale, zp).item() == 0.0  # Algorithm 3: 0.0 round-trips exactly


def test_algorithm2_hand_values_signed_and_low_bits():
    scale, zp = choose_qparams(-1.0, 2.0, bits=8, signed=True)
    assert zp.item() == -128 + 85
    assert quantize(torch.tensor([0.0, -1.0, 2.0]), scale, zp, 8, True).tolist() == [-43, -128, 127]

    scale, zp = choose_qparams(-1.0, 2.0, bits=4, signed=False)  # scale 3/15 = 0.2, zp = 5
    assert scale.item() == pytest.approx(0.2, rel=1e-7) and zp.item() == 5
    q = quantize(torch.tensor([-1.0, 0.0, 0.65, 2.0, 9.0, -4.0]), scale, zp, 4, False)
    assert q.tolist() == [0, 5, 8, 15, 15, 0]
    assert dequantize(q, scale, zp)[2].item() == pytest.approx(0.6, rel=1e-6)

    scale, zp = choose_qparams(0.5, 3.0, bits=2, signed=False)  # range extended to [0, 3]: scale 1, zp 0
    assert scale.item() == 1.0 and zp.item() == 0
    assert quantize(torch.tensor([-0.4, 0.4, 1.6, 2.9, 7.0]), scale, zp, 2, False).tolist() == [0, 0, 2, 3, 3]

    scale, zp = choose_qparams(-1.0, 2.0, bits=2, signed=True)  # codes -2..1, scale 1, zp -1
    assert scale.item() == 1.0 and zp.item() == -1
    assert quantize(torch.tensor([-1.0, 0.0, 2.0, 5.0]), scale, zp, 2, True).tolist() == [-2, -1, 1, 1]


def test_symmetric_qparams():
    scale, zp = choose_qparams(-1.0, 2.0, bits=8, signed=True, symmetric=True)
    assert scale.item() == pytest.approx(2.0 / 127.5, rel=1e-7) and zp.item() == 0
    scale, zp = choose_qparams(-1.0, 2.0, bits=8, signed=False, symmetric=True)
    assert zp.item() == 128
    scale, zp = choose_qparams(-3.0, 1.0, bits=4, signed=True, symmetric=True)
    assert scale.item() == pytest.approx(3.0 / 7.5, rel=1e-7) and zp.item() == 0
    # Constant-zero input: scale floors at eps instead of dividing by zero.
    scale, zp = choose_qparams(0.0, 0.0)
    assert scale.item() > 0 and zp.item() == 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_within_half_scale(bits, signed, symmetric):
    g = torch.Generator().manual_seed(bits * 10 + signed)
    x = torch.randn(4000, generator=g) * 2 + 0.3
    scale, zp = choose_qparams(x.min(), x.max(), bits, signed, symmetric)
    xr = dequantize(quantize(x, scale, zp, bits, signed), scale, zp)
    assert (x - xr).abs().max().item() <= scale.item() * (0.5 + 1e-5)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_matches_per_slice(axis):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 3, generator=g) * torch.arange(1, 6).view(1, 5, 1)
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    scale, zp = choose_qparams(flat.amin(1), flat.amax(1), bits=4)
    assert scale.shape == zp.shape == (x.shape[axis],)
    q = quantize(x, scale, zp, 4, False, axis=axis)
    xr = dequantize(q, scale, zp, axis=axis)
    for c in range(x.shape[axis]):
        sl = x.select(axis, c)
        assert torch.equal(q.select(axis, c), quantize(sl, scale[c], zp[c], 4, False))
        assert torch.equal(xr.select(axis, c), dequantize(q.select(axis, c), scale[c], zp[c]))
        assert (sl - xr.select(axis, c)).abs().max() <= scale[c] * (0.5 + 1e-5)


# ---------------------------------------------------------------- straight-through estimator
def test_ste_gradient_mask_by_hand():
    scale, zp = choose_qparams(-1.0, 2.0)
    x = torch.tensor([-3.0, -1.0, 0.0, 1.5, 2.0, 2.5, 9.0], requires_grad=True)
    y = fake_quantize(x, scale, zp)
    y.backward(torch.full_like(y, 2.0))
    assert x.grad.tolist() == [0.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0]
    assert y[2].item() == 0.0 and y[0].item() == pytest.approx(-1.0, abs=1e-6) and y[-1].item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("signed", [False, True])
def test_fake_quant_per_tensor_matches_torch(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=g) * 3
    scale, zp = choose_qparams(-2.0, 4.0, 8, signed)
    qmin, qmax = qrange(8, signed)
    ties = (torch.arange(-300, 300, dtype=torch.float32) + 0.5) * scale  # exact .5 cases exercise rounding
    for data in (x, ties):
        a = data.clone().requires_grad_()
        b = data.clone().requires_grad_()
        ya = fake_quantize(a, scale, zp, 8, signed)
        yb = torch.fake_quantize_per_tensor_affine(b, scale, zp, qmin, qmax)
        assert torch.equal(ya, yb)
        ya.sum().backward()
        yb.sum().backward()
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("signed", [False, True])
def test_fake_quant_per_channel_matches_torch(axis, signed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, 4, generator=g) * 2
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    # Shrink the range so some values are clamped and get zero gradient.
    scale, zp = choose_qparams(flat.amin(1) * 0.7, flat.amax(1) * 0.7, 8, signed)
    qmin, qmax = qrange(8, signed)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fake_quantize(a, scale, zp, 8, signed, axis=axis)
    yb = torch.fake_quantize_per_channel_affine(b, scale, zp, axis, qmin, qmax)
    assert torch.equal(ya, yb)
    ya.backward(torch.ones_like(ya))
    yb.backward(torch.ones_like(yb))
    assert torch.equal(a.grad, b.grad) and 0 < a.grad.sum() < a.numel()


# ---------------------------------------------------------------- observers vs torch.ao
def _ao_pair(kind, signed, symmetric):
    dtype = torch.qint8 if signed else torch.quint8
    if kind.endswith("channel"):
        qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    else:
        qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    ours = {
        "minmax": MinMaxObserver(8, signed, symmetric),
        "moving": MinMaxObserver(8, signed, symmetric, averaging_constant=0.1),
        "minmax_channel": MinMaxObserver(8, signed, symmetric, per_channel_axis=1),
        "moving_channel": MinMaxObserver(8, signed, symmetric, averaging_constant=0.1, per_channel_axis=1),
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = {
            "minmax": lambda: ao_obs.MinMaxObserver(dtype=dtype, qscheme=qscheme),
            "moving": lambda: ao_obs.MovingAverageMinMaxObserver(averaging_constant=0.1, dtype=dtype, qscheme=qscheme),
            "minmax_channel": lambda: ao_obs.PerChannelMinMaxObserver(ch_axis=1, dtype=dtype, qscheme=qscheme),
            "moving_channel": lambda: ao_obs.MovingAveragePerChannelMinMaxObserver(
                averaging_constant=0.1, ch_axis=1, dtype=dtype, qscheme=qscheme
            ),
        }[kind]()
    return ours, theirs


@pytest.mark.parametrize("kind", ["minmax", "moving", "minmax_channel", "moving_channel"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_observer_qparams_match_torch_ao(kind, signed, symmetric):
    ours, theirs = _ao_pair(kind, signed, symmetric)
    g = torch.Generator().manual_seed(7)
    for i in range(4):
        x = torch.randn(8, 16, 5, generator=g) * (i + 1) + 0.3 * i
        ours(x)
        theirs(x)
    s1, z1 = ours.calculate_qparams()
    s2, z2 = theirs.calculate_qparams()
    s2, z2 = s2.reshape(s1.shape).float(), z2.reshape(z1.shape).int()
    # Exact or within 1 ulp of the scale; zero points identical.
    assert ((s1 - s2).abs() <= torch.finfo(torch.float32).eps * s2.abs()).all()
    assert torch.equal(z1, z2)


def test_moving_average_matches_hand_loop():
    obs = MinMaxObserver(averaging_constant=0.25)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(100, generator=g) * (1 + i) for i in range(5)]
    lo, hi = None, None
    for b in batches:
        obs(b)
        if lo is None:
            lo, hi = b.min().item(), b.max().item()  # first batch initialises
        else:
            lo = 0.75 * lo + 0.25 * b.min().item()
            hi = 0.75 * hi + 0.25 * b.max().item()
    assert obs.min_val.item() == pytest.approx(lo, rel=1e-6)
    assert obs.max_val.item() == pytest.approx(hi, rel=1e-6)
    plain = MinMaxObserver()
    for b in batches:
        plain(b)
    assert plain.min_val.item() == min(b.min().item() for b in batches)


def test_observer_buffers_in_state_dict_and_reload():
    obs = MinMaxObserver(per_channel_axis=0, averaging_constant=0.5)
    obs(torch.randn(3, 10))
    sd = obs.state_dict()
    assert set(sd) == {"min_val", "max_val"} and sd["min_val"].shape == (3,)
    assert {n for n, _ in obs.named_buffers()} == {"min_val", "max_val"}
    fresh = MinMaxObserver(per_channel_axis=0, averaging_constant=0.5)
    fresh.load_state_dict(sd)  # per-channel buffers start empty and take the saved size
    assert torch.equal(fresh.min_val, obs.min_val) and torch.equal(fresh.calculate_qparams()[0], obs.calculate_qparams()[0])
    assert obs.to(torch.device("cpu")).min_val.device.type == "cpu"


def test_fake_quantize_module_state_switches_and_checkpoint():
    torch.manual_seed(0)
    fq = FakeQuantize(bits=8, averaging_constant=0.1, per_channel_axis=None)
    with pytest.raises(RuntimeError, match="before any data"):
        fq.calculate_qparams()
    x = torch.randn(32, 8)
    y = fq(x)
    s, z = fq.calculate_qparams()
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255))
    assert "bits=8" in repr(fq) and "observer_enabled=True" in repr(fq)

    fq.enable_observer(False)
    frozen = fq.scale.clone()
    fq(torch.randn(32, 8) * 10)
    assert torch.equal(fq.scale, frozen)  # observer off: qparams frozen
    fq.enable_fake_quant(False)
    x2 = torch.randn(4, 8) * 10
    assert torch.equal(fq(x2), x2)  # fake quant off: identity

    buf = io.BytesIO()
    torch.save(fq.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert {"scale", "zero_point", "observer_enabled", "fake_quant_enabled", "observer.min_val", "observer.max_val"} <= set(sd)
    fresh = FakeQuantize(bits=8, averaging_constant=0.1)
    fresh.load_state_dict(sd)
    assert fresh.observer_enabled.item() == 0 and fresh.fake_quant_enabled.item() == 0
    fresh.enable_fake_quant(True)
    fq.enable_fake_quant(True)
    assert torch.equal(fresh(x2), fq(x2))


def test_fake_quantize_module_per_channel_matches_torch_and_needs_data():
    fq = FakeQuantize(bits=8, signed=True, symmetric=True, per_channel_axis=0)
    w = torch.randn(5, 7, requires_grad=True)
    w_ref = w.detach().clone().requires_grad_()
    y = fq(w)
    s, z = fq.calculate_qparams()
    y_ref = torch.fake_quantize_per_channel_affine(w_ref, s, z, 0, -128, 127)
    assert torch.equal(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    # Symmetric 8-bit maps max|w| to 127.5, which rounds to 128 and is clamped: torch and we both
    # give that one element zero gradient; everything else passes straight through.
    assert torch.equal(w.grad, w_ref.grad) and w.grad.sum() >= w.numel() - w.shape[0]
    cold = FakeQuantize().enable_observer(False)
    with pytest.raises(RuntimeError, match="no scale/zero_point"):
        cold(torch.randn(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fake_quantize_moves_to_cuda():
    fq = FakeQuantize(per_channel_axis=1).cuda()
    x = torch.randn(4, 3, device="cuda")
    y = fq(x)
    assert fq.scale.device.type == "cuda" and fq.observer.min_val.device.type == "cuda"
    s, z = fq.calculate_qparams()
    assert torch.equal(y, torch.fake_quantize_per_channel_affine(x, s, z, 1, 0, 255))


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "8"])
def test_bad_bits(bits):
    with pytest.raises(ConfigError, match="bits"):
        qrange(bits, False)
    with pytest.raises(ConfigError, match="bits"):
        quantize(torch.zeros(3), 0.1, 0, bits=bits)
    with pytest.raises(ConfigError, match="bits"):
        MinMaxObserver(bits=bits)


def test_bad_scale_zero_point_axis_and_range():
    x = torch.randn(4, 3)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="scale"):
            quantize(x, bad, 0)
    with pytest.raises(ConfigError, match="scale"):
        fake_quantize(x, torch.tensor([0.1, 0.0, 0.2]), torch.zeros(3, dtype=torch.int32), axis=1)
    with pytest.raises(ConfigError, match="axis"):
        fake_quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32), axis=2)
    with pytest.raises(ConfigError, match="axis"):
        quantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32), axis=0)  # 4 channels on axis 0, 3 scales
    with pytest.raises(ConfigError, match="axis=None"):
        dequantize(x, torch.ones(3), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ConfigError, match="zero_point"):
        quantize(x, 0.1, 300, bits=8)
    with pytest.raises(ConfigError, match="zero_point"):
        quantize(x, 0.1, 1.5)
    with pytest.raises(ConfigError, match="x_min must be <= x_max"):
        choose_qparams(2.0, 1.0)
    with pytest.raises(ConfigError, match="finite"):
        choose_qparams(float("-inf"), 1.0)
    with pytest.raises(ConfigError, match="averaging_constant"):
        MinMaxObserver(averaging_constant=0.0)
    with pytest.raises(ConfigError, match="averaging_constant"):
        MinMaxObserver(averaging_constant=1.5)
    with pytest.raises(ConfigError, match="per_channel_axis"):
        MinMaxObserver(per_channel_axis=3)(torch.randn(2, 2))
    with pytest.raises(ConfigError, match="symmetric"):
        FakeQuantize(symmetric="yes")
