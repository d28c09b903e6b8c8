"""Weight-only b-bit quantization: packing, schemes, file size, save/load exactness, errors."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from lightning_eff.compression.quantization import weight_only as wo
from lightning_eff.compression.quantization.weight_only import (
    dequantize_model,
    load_quantized,
    pack_codes,
    quantize_weights,
    save_quantized,
    unpack_codes,
    weight_quantization_error,
)
from lightning_eff.errors import ConfigError, NoEffectWarning

torch.set_num_threads(1)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    ).eval()


# ---------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [0, 1, 3, 7, 13, 1001])
def test_pack_unpack_round_trip(bits, numel):
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8)  # dense
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_pack_layout_and_bad_codes():
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21]  # first code in the low nibble
    assert pack_codes(torch.tensor([1, 2, 3, 0, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4, 3]
    assert pack_codes(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]
    with pytest.raises(ConfigError, match="codes"):
        pack_codes(torch.tensor([16]), 4)
    with pytest.raises(ConfigError, match="bits"):
        pack_codes(torch.tensor([1]), 9)
    with pytest.raises(ConfigError, match="packed"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 4, 3)


# ---------------------------------------------------------------- schemes
@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_affine_and_symmetric_error_within_half_scale(scheme, bits, per_channel):
    model = _convnet()
    qw = quantize_weights(model, bits=bits, scheme=scheme, per_channel=per_channel)
    assert set(qw.tensors) == {"0.weight", "3.weight", "4.weight", "8.weight"}
    for key, qt in qw.tensors.items():
        w = model.state_dict()[key]
        rows = w.shape[0] if per_channel else 1
        err = (w - qt.dequantize()).reshape(rows, -1).abs().amax(dim=1)
        scale = qt.scale.float().reshape(-1)
        assert qt.scale.dtype == torch.float16 and qt.bits == bits
        assert (err <= scale * 0.5 * (1 + 1e-4)).all(), key
        # 0.0 is exactly representable (Algorithm 2): a zeroed weight stays exactly zero.
        w0 = w.clone()
        w0.view(-1)[::3] = 0.0
        qt0 = wo._quantize_tensor(w0, bits, scheme, per_channel)
        assert (qt0.dequantize().view(-1)[::3] == 0).all()


@pytest.mark.parametrize("per_channel", [True, False])
def test_binary_values_and_alpha(per_channel):
    model = _convnet()
    qw = quantize_weights(model, scheme="binary", per_channel=per_channel)
    for key, qt in qw.tensors.items():
        w = model.state_dict()[key]
        rows = w.reshape(w.shape[0] if per_channel else 1, -1)
        wq = qt.dequantize().reshape(rows.shape)
        alpha = rows.abs().mean(dim=1, keepdim=True)  # XNOR-Net optimal scale
        assert qt.bits == 1 and qt.zero_point is None
        assert torch.allclose(wq.abs(), alpha.expand_as(wq), rtol=1e-3)
        assert torch.equal(torch.sign(wq), torch.where(rows >= 0, 1.0, -1.0))
        assert qt.codes.numel() == math.ceil(w.numel() / 8)


def test_ternary_values_threshold_and_alpha():
    model = _convnet()
    qw = quantize_weights(model, scheme="ternary")
    for key, qt in qw.tensors.items():
        rows = model.state_dict()[key].reshape(qt.shape[0], -1)
        wq = qt.dequantize().reshape(rows.shape)
        delta = 0.7 * rows.abs().mean(dim=1, keepdim=True)  # TWN threshold
        keep = rows.abs() > delta
        alpha = (rows.abs() * keep).sum(1) / keep.sum(1)
        assert torch.equal(wq == 0, ~keep)
        assert torch.equal(torch.sign(wq), torch.sign(rows) * keep)
        assert torch.allclose(wq.abs().amax(dim=1), alpha, rtol=1e-3)
        assert set(torch.unique(wq / alpha[:, None].to(torch.float16).float()).round().tolist()) <= {-1.0, 0.0, 1.0}
        assert qt.bits == 2


# ---------------------------------------------------------------- bytes on disk
def test_file_bytes_shrink(tmp_path):
    model = _mlp()
    fp32 = tmp_path / "fp32.pt"
    torch.save(model.state_dict(), fp32)
    sizes = {}
    for scheme, bits in [("affine", 8), ("affine", 4), ("affine", 2), ("binary", None)]:
        path = tmp_path / f"{scheme}{bits}.pt"
        save_quantized(model, path, scheme=scheme, bits=bits)
        sizes[(scheme, bits)] = os.path.getsize(path) / os.path.getsize(fp32)
    assert sizes[("affine", 4)] <= 0.14
    assert sizes[("binary", None)] < sizes[("affine", 2)] < sizes[("affine", 4)] < sizes[("affine", 8)] <= 0.27
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # no temp files left behind


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("scheme,bits", [("affine", 4), ("symmetric", 3), ("ternary", None), ("binary", None)])
def test_load_quantized_equals_in_memory(tmp_path, scheme, bits):
    model = _convnet()
    model[1].running_mean.normal_()  # non-default BN state must survive untouched
    qw = save_quantized(model, tmp_path / "q.pt", scheme=scheme, bits=bits)
    in_memory = dequantize_model(_convnet(seed=1), qw).eval()
    loaded = load_quantized(tmp_path / "q.pt", lambda: _convnet(seed=2)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(in_memory(x), loaded(x))
    for key in ("0.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked", "8.bias"):
        assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])
    # Passing a module instead of a factory loads into that instance.
    target = _convnet(seed=3)
    assert load_quantized(tmp_path / "q.pt", target) is target


def test_file_loads_with_weights_only_and_overwrites_atomically(tmp_path, monkeypatch):
    model = _mlp()
    path = tmp_path / "q.pt"
    save_quantized(model, path, bits=4)
    state = torch.load(path, weights_only=True)
    assert state["format"] == "lightning_eff.weight_only" and state["tensors"]["0.weight"]["codes"].dtype == torch.uint8
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(wo.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, path, bits=2)
    assert path.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == ["q.pt"]  # and the temp file was removed


def test_8bit_outputs_close_to_float():
    model = _mlp().eval()
    x = torch.randn(64, 256)
    qmodel = dequantize_model(_mlp(seed=5), quantize_weights(model, bits=8)).eval()
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert (out - ref).norm() / ref.norm() < 0.02


def test_fp16_model_keeps_dtype(tmp_path):
    model = _mlp().half()
    save_quantized(model, tmp_path / "q.pt", bits=8)
    loaded = load_quantized(tmp_path / "q.pt", _mlp(seed=1).half())
    assert loaded[0].weight.dtype == torch.float16
    assert torch.allclose(loaded[0].weight.float(), model[0].weight.float(), atol=2e-3)


# ---------------------------------------------------------------- selection, tied weights, errors
def test_selection_regex_min_numel_and_rest_untouched():
    model = _convnet()
    qw = quantize_weights(model, include=r"^[48]$")
    assert set(qw.tensors) == {"4.weight", "8.weight"}
    assert torch.equal(qw.rest["0.weight"], model[0].weight.detach())  # unselected: kept as-is
    qw = quantize_weights(model, include=[nn.Conv2d, "^8$"], min_numel=150)  # depthwise 16*1*3*3=144 stays float
    assert set(qw.tensors) == {"0.weight", "4.weight", "8.weight"} and "3.weight" in qw.rest
    with pytest.warns(NoEffectWarning, match="include"):
        empty = quantize_weights(model, include=nn.LSTM)
    assert len(empty) == 0


def test_the_selection_options_every_technique_shares():
    """include / exclude / module_types / min_params, as pruning and activation checkpointing name them."""
    model = _convnet()
    every = set(quantize_weights(model).tensors)
    assert set(quantize_weights(model, exclude=["^8$"]).tensors) == every - {"8.weight"}
    only_conv = set(quantize_weights(model, include=".*", module_types=["Conv2d"]).tensors)
    assert only_conv and all(isinstance(model.get_submodule(k.rsplit(".", 1)[0]), nn.Conv2d) for k in only_conv)
    assert set(quantize_weights(model, min_params=150).tensors) == {k for k in every if model.get_parameter(k).numel() >= 150}
    with pytest.warns(FutureWarning, match="renamed min_params"):
        old = quantize_weights(model, min_numel=150)
    assert set(old.tensors) == set(quantize_weights(model, min_params=150).tensors)


def test_tied_weights_stay_tied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))
    model[1].weight = model[0].weight
    qw = quantize_weights(model, bits=4)
    assert list(qw.tensors) == ["0.weight"] and qw.aliases == {"1.weight": "0.weight"}
    fresh = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))
    dequantize_model(fresh, qw)
    assert torch.equal(fresh[0].weight, fresh[1].weight)


def test_weight_quantization_error():
    model = _mlp()
    errs = {b: weight_quantization_error(model, quantize_weights(model, bits=b)) for b in (2, 4, 8)}
    w = model[2].weight.detach()
    wq = quantize_weights(model, bits=4).tensors["2.weight"].dequantize()
    assert errs[4]["2.weight"] == pytest.approx(((w - wq).norm() / w.norm()).item(), rel=1e-6)
    for key in errs[4]:
        assert 0 < errs[8][key] < errs[4][key] < errs[2][key] < 1


def test_bad_options_and_mismatched_model(tmp_path):
    model = _mlp()
    with pytest.raises(ConfigError, match="Did you mean 'affine'"):
        quantize_weights(model, scheme="afine")
    for bits in (1, 9, 4.5, True):
        with pytest.raises(ConfigError, match="bits"):
            quantize_weights(model, bits=bits)
    with pytest.raises(ConfigError, match="bits=4 does not fit scheme='binary'"):
        quantize_weights(model, bits=4, scheme="binary")
    with pytest.raises(ConfigError, match="per_channel"):
        quantize_weights(model, per_channel="yes")
    with pytest.raises(ConfigError, match="min_params"):
        quantize_weights(model, min_params=-1)
    with pytest.raises(ConfigError, match="give min_params only"):
        quantize_weights(model, min_params=4, min_numel=4)
    with pytest.raises(ConfigError, match="exclude"):
        quantize_weights(model, exclude="[unclosed")
    with pytest.raises(ConfigError, match="module_types"):
        quantize_weights(model, module_types=[3])
    with pytest.raises(ConfigError, match="regex"):
        quantize_weights(model, include="[unclosed")
    with pytest.raises(ConfigError, match="include"):
        quantize_weights(model, include=[3])
    qw = save_quantized(model, tmp_path / "q.pt")
    with pytest.raises(ConfigError, match="only apply when saving a model"):
        save_quantized(qw, tmp_path / "q2.pt", bits=2)
    with pytest.raises(ConfigError, match="does not match"):
        load_quantized(tmp_path / "q.pt", _convnet)
    torch.save({"a": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="not a weight-only quantized file"):
        load_quantized(tmp_path / "plain.pt", _mlp)
