"""FX quantization core: fusion equivalence, fold_conv_bn, prepare/convert per engine, SQNR gate, pre-flight."""
from __future__ import annotations

import copy

import pytest
import torch
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from lightning_eff.compression.quantization.engines import (
    check_engine,
    model_engine,
    quantized_engine,
    supported_engines,
)
from lightning_eff.compression.quantization.fusion import (
    fold_conv_bn,
    fuse_for_quantization,
    split_norm_act,
)
from lightning_eff.compression.quantization.fx import (
    build_qconfig_mapping,
    calibrate,
    convert_fx_model,
    dynamic_quantize,
    freeze_bn_stats,
    prepare_ptq_fx_model,
    prepare_qat_fx_model,
    set_fake_quant,
    set_observers,
    sqnr_db,
)
from lightning_eff.compression.quantization.preflight import check_quantizable
from lightning_eff.errors import ConfigError, NoEffectWarning
from lightning_eff.models import create_model


def _warm_bn(model: nn.Module, shape, steps: int = 3) -> nn.Module:
    """Give BN layers non-trivial running statistics (random init has mean 0 / var 1)."""
    model.train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape, generator=gen) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_timm():
    torch.manual_seed(0)
    return _warm_bn(create_model("mobilenetv2_tiny"), (8, 1, 32, 32))


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


# ----------------------------------------------------------------------------------- fusion
def test_fusion_equivalence_keeps_outputs(tiny_timm):
    x = torch.randn(4, 1, 32, 32)
    fused = fuse_for_quantization(tiny_timm, relu6="keep", example_inputs=(x,))
    assert fused is not tiny_timm
    assert not any(isinstance(m, BatchNormAct2d) for m in fused.modules())
    assert any(isinstance(m, BatchNormAct2d) for m in tiny_timm.modules())  # original untouched
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tiny_timm(x), atol=1e-6, rtol=1e-5)
        # train mode too: same batch statistics, same running-stat updates
        a, b = copy.deepcopy(tiny_timm).train(), copy.deepcopy(fused).train()
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_fusion_relu6_option(tiny_timm):
    relu = fuse_for_quantization(tiny_timm, relu6="relu", check=False)
    keep = fuse_for_quantization(tiny_timm, relu6="keep", check=False)
    assert not any(isinstance(m, nn.ReLU6) for m in relu.modules())
    assert sum(isinstance(m, nn.ReLU6) for m in keep.modules()) == sum(isinstance(m, nn.ReLU6) for m in tiny_timm.modules()) > 0
    with pytest.raises(ConfigError, match="relu6"):
        fuse_for_quantization(tiny_timm, relu6="clip")


def test_wrong_rewrite_raises_naming_the_group(tiny_timm):
    def drops_activation(module):  # a deliberately wrong rule: loses the ReLU6
        seq = split_norm_act(module)
        return seq.bn if isinstance(seq, nn.Sequential) else seq

    with pytest.raises(ConfigError, match=r"module group 'bn1'.*BatchNormAct2d"):
        fuse_for_quantization(tiny_timm, relu6="keep", rewrites={BatchNormAct2d: drops_activation})


def test_fold_conv_bn_exact():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(4, 8, 3, groups=2, bias=False), nn.Conv2d(8, 8, 3, groups=8), nn.Conv1d(3, 6, 5)):
        bn = (nn.BatchNorm1d if isinstance(conv, nn.Conv1d) else nn.BatchNorm2d)(conv.out_channels)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 3)
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
        bn.eval()
        x = torch.randn(2, conv.in_channels, *([9] * (conv.weight.dim() - 2)))
        folded = fold_conv_bn(conv, bn)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), bn(conv(x)), atol=2e-6, rtol=1e-5)
        assert folded.bias is not None and conv.weight is not folded.weight
    with pytest.raises(ConfigError, match="num_features"):
        fold_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))


# ---------------------------------------------------------------------------- prepare/convert
@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_qat_prepare_convert_and_prepared_stays_trainable(tiny_timm, engine):
    x = torch.randn(2, 1, 16, 16)
    prepared = prepare_qat_fx_model(tiny_timm, (x,), engine=engine)
    assert not prepared.training  # keeps the input model's mode (the fixture is in eval mode)
    prepared.train()
    # the fix for timm: every BN is fused with its conv (no standalone BN left)
    called = [type(prepared.get_submodule(n.target)) for n in prepared.graph.nodes if n.op == "call_module"]
    assert nn.BatchNorm2d not in called and not any(n.target is torch.nn.functional.batch_norm for n in prepared.graph.nodes)
    assert any(type(m).__name__ == "ConvBnReLU2d" for m in prepared.modules())
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(2):
        loss = prepared(torch.randn(2, 1, 16, 16)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    int8 = convert_fx_model(prepared)
    assert prepared.training and int8 is not prepared
    assert any("quantized" in type(m).__module__ for m in int8.modules())
    with quantized_engine(engine):
        out = int8(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # a training step after convert still works on the prepared model (Lightning #7427)
    before = [p.detach().clone() for p in prepared.parameters()]
    loss = prepared(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, prepared.parameters()))


@pytest.mark.parametrize("engine", supported_engines())
def test_sqnr_gate_every_engine(engine):
    model = _warm_bn(_tiny_cnn(), (16, 3, 16, 16))
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(16, 3, 16, 16, generator=gen) * 2 + 0.5 for _ in range(4)]
    prepared = prepare_ptq_fx_model(model, data[0], engine=engine, observer="minmax")
    assert calibrate(prepared, data) == 4
    int8 = convert_fx_model(prepared)
    x = torch.randn(8, 3, 16, 16, generator=gen) * 2 + 0.5
    with quantized_engine(engine), torch.no_grad():
        quality = sqnr_db(model(x), int8(x))
    # qnnpack included: its int8 ReLU6 on channels-last tensors needs our work-around
    assert quality > 30, f"{engine}: SQNR {quality:.1f} dB"


def test_engine_typo_did_you_mean(tiny_timm):
    with pytest.raises(ConfigError, match="Did you mean 'qnnpack'"):
        check_engine("qnnpak")
    with pytest.raises(ConfigError, match="engine='qnnpak'.*Did you mean 'qnnpack'"):
        prepare_qat_fx_model(tiny_timm, torch.randn(1, 1, 32, 32), engine="qnnpak")
    with pytest.raises(ConfigError, match="observer"):
        prepare_qat_fx_model(tiny_timm, torch.randn(1, 1, 32, 32), observer="minmx")


def test_engine_context_restores():
    before = torch.backends.quantized.engine
    other = next(e for e in supported_engines() if e != before)
    with quantized_engine(other):
        assert torch.backends.quantized.engine == other
    assert torch.backends.quantized.engine == before


# --------------------------------------------------------------------------------- pre-flight
class _Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class _NeedsBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.gate = _Branchy()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_preflight_names_untraceable_module():
    with pytest.raises(ConfigError, match=r"tracing module 'gate' \(_Branchy\)"):
        check_quantizable(_NeedsBranch(), torch.randn(1, 1, 8, 8), "x86")


def test_preflight_embedding_qconfig():
    from torch.ao.quantization import get_default_qconfig_mapping

    model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 2))
    tokens = torch.randint(0, 20, (2, 3))
    with pytest.raises(ConfigError, match=r"module '0' \(Embedding\).*weight-only"):
        check_quantizable(model, tokens, "x86", qconfig_mapping=get_default_qconfig_mapping("x86"))
    report = check_quantizable(model, tokens, "x86", qconfig_mapping=build_qconfig_mapping("x86", qat=False))
    assert report["embeddings"] == ["0"]


# ------------------------------------------------------------------------------------ switches
def test_switches_freeze_observers_and_fake_quant(tiny_timm):
    x = torch.randn(2, 1, 16, 16)
    prepared = prepare_qat_fx_model(tiny_timm, (x,), engine="x86")
    prepared.train()
    prepared(x)  # observe once, then freeze everything
    assert freeze_bn_stats(prepared) > 0
    conv_bn = next(m for m in prepared.modules() if type(m).__name__ == "ConvBnReLU2d")
    stats = conv_bn.bn.running_mean.clone()
    assert set_observers(prepared, False) > 0
    fq = next(m for m in prepared.modules() if hasattr(m, "scale") and hasattr(m, "disable_observer"))
    scale = fq.scale.clone()
    prepared(torch.randn(2, 1, 16, 16) * 5)
    assert torch.equal(conv_bn.bn.running_mean, stats) and torch.equal(fq.scale, scale)
    assert set_fake_quant(prepared, False) > 0
    assert int(fq.fake_quant_enabled[0]) == 0
    with pytest.warns(NoEffectWarning):
        set_fake_quant(nn.Linear(2, 2), True)


def test_dynamic_quantize_text_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    q = dynamic_quantize(model)
    assert type(q[0]).__module__.startswith("torch.ao.nn.quantized.dynamic") and type(model[0]) is nn.Linear
    x = torch.randn(8, 16)
    assert sqnr_db(model(x), q(x)) > 25
    with pytest.raises(ConfigError, match="dtypes"):
        dynamic_quantize(model, dtypes=("Linear",))


def test_qat_with_zero_init_bn_is_finite():
    model = _tiny_cnn()
    nn.init.zeros_(model[4].weight)  # zero-init residual style: torch's ConvBn QAT computes 0/0
    x = torch.randn(4, 3, 16, 16)
    with pytest.warns(UserWarning, match="exactly 0"):
        prepared = prepare_qat_fx_model(model, x)
    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(2):
        out = prepared(x)
        assert torch.isfinite(out).all()
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
    assert model[4].weight.abs().sum() == 0  # the user's model is untouched


def test_engine_survives_deepcopy():
    x = torch.randn(2, 3, 16, 16)
    prepared = prepare_ptq_fx_model(_tiny_cnn().eval(), x, engine="qnnpack", observer="minmax")
    calibrate(prepared, [x])
    int8 = convert_fx_model(copy.deepcopy(prepared))
    assert model_engine(copy.deepcopy(int8)) == "qnnpack" == model_engine(int8)


def test_sqnr_reference_values():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref.clone()) == float("inf")
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)
    with pytest.raises(ConfigError, match="shapes differ"):
        sqnr_db(ref, torch.ones(10))


def test_calibrate_without_batches_refused():
    model = _tiny_cnn().eval()
    prepared = prepare_ptq_fx_model(model, torch.randn(2, 3, 16, 16), observer="minmax")
    with pytest.raises(ConfigError, match="no batches"):
        calibrate(prepared, [])


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_per_channel_depthwise_only(tiny_timm, engine, tmp_path):
    """per_channel='depthwise': per-channel scales on the depthwise convs, per-tensor on the rest;
    the TorchScript artifact shrinks by ~16 bytes per non-depthwise output channel, SQNR holds."""
    from lightning_eff.compression.quantization.fx import depthwise_conv_names
    from lightning_eff.export import export_torchscript

    dw = set(depthwise_conv_names(tiny_timm))
    assert dw and all(tiny_timm.get_submodule(n).groups > 1 for n in dw)
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(8, 1, 32, 32, generator=gen) * 2 + 0.5 for _ in range(4)]
    x = torch.randn(8, 1, 32, 32, generator=gen) * 2 + 0.5
    sizes, schemes, quality = {}, {}, {}
    for per_channel in (True, "depthwise"):
        prepared = prepare_ptq_fx_model(tiny_timm, data[0], engine=engine, per_channel=per_channel, observer="minmax")
        calibrate(prepared, data)
        int8 = convert_fx_model(prepared)
        weights = {n: m.weight() for n, m in int8.named_modules() if hasattr(m, "weight") and callable(m.weight)}
        schemes[per_channel] = {n: w.qscheme() for n, w in weights.items()}
        with quantized_engine(engine), torch.no_grad():
            quality[per_channel] = sqnr_db(tiny_timm(x), int8(x))
        path = tmp_path / f"{per_channel}.pt"
        export_torchscript(int8, (x,), path, method="script")
        sizes[per_channel] = path.stat().st_size
    mixed = schemes["depthwise"]
    assert {n for n, q in mixed.items() if q == torch.per_channel_affine} == dw  # FX keeps the conv's path
    assert all(q == torch.per_tensor_affine for n, q in mixed.items() if n not in dw) and len(mixed) > len(dw)
    assert all(q == torch.per_channel_affine for q in schemes[True].values())
    other_channels = sum(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for n, m in tiny_timm.named_modules()
                         if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in dw)
    assert sizes[True] - sizes["depthwise"] >= 12 * other_channels, (sizes, other_channels)
    # a random deep net's int8 error is dominated by activations (~12-19 dB either way); the weight
    # granularity of the non-depthwise layers must not add much to it
    assert quality["depthwise"] > quality[True] - 3.0, quality
    with pytest.raises(ConfigError, match=r"per_channel='layer' is not valid; choose one of \[True, False, 'depthwise'\]"):
        prepare_qat_fx_model(tiny_timm, data[0], per_channel="layer")


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_qat_fold_bn_fine_tunes_the_folded_network(tiny_timm, engine):
    """fold_bn=True: no BatchNorm (and no fused Conv-BN QAT module) is left; with fake quantization off the
    prepared network computes the float network's eval output in train mode too; the depthwise
    per-channel scheme still lands on the depthwise convs; every parameter gets a gradient; the int8
    model agrees with the fake-quant model it was converted from."""
    from lightning_eff.compression.quantization.fx import depthwise_conv_names

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 1, 32, 32, generator=gen) * 2 + 0.5
    with torch.no_grad():
        ref = tiny_timm(x)
    prepared = prepare_qat_fx_model(tiny_timm, (x[:1],), engine=engine, per_channel="depthwise", relu6="keep", fold_bn=True)
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in tiny_timm.modules())  # the input is untouched
    with torch.no_grad():
        torch.testing.assert_close(tiny_timm(x), ref, rtol=0, atol=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prepared.modules())
    assert not any(type(m).__name__.startswith("ConvBn") for m in prepared.modules())
    assert any(type(m).__name__ == "Conv2d" and "qat" in type(m).__module__ for m in prepared.modules())  # plain QAT convs
    set_fake_quant(prepared, False)
    set_observers(prepared, False)
    prepared.train()
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), ref, rtol=1e-4, atol=1e-4)
    set_fake_quant(prepared, True)
    set_observers(prepared, True)
    loss = prepared(x).square().mean()
    loss.backward()
    missing = [n for n, p in prepared.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    dw = set(depthwise_conv_names(tiny_timm))
    with torch.no_grad():  # observe a few more batches, then fix the scales the int8 model gets
        for _ in range(4):
            prepared(torch.randn(8, 1, 32, 32, generator=gen) * 2 + 0.5)
    set_observers(prepared, False)
    int8 = convert_fx_model(prepared.eval())
    schemes = {n: m.weight().qscheme() for n, m in int8.named_modules() if hasattr(m, "weight") and callable(m.weight)}
    assert {n for n, q in schemes.items() if q == torch.per_channel_affine} == dw
    with quantized_engine(engine), torch.no_grad():
        # the int8 kernels compute what fake quantization simulated; on this random deep net activation
        # rounding keeps it near 13-16 dB (the fused Conv-BN QAT path: 5-7 dB), a broken conversion near 0
        assert sqnr_db(prepared(x), int8(x)) > 10.0
    with pytest.warns(NoEffectWarning, match="no fused ConvBn QAT module"):
        freeze_bn_stats(prepared)


def test_fold_batch_norms_leaves_its_input_alone(tiny_timm):
    from lightning_eff.compression.quantization.fx import fold_batch_norms

    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = tiny_timm.eval()(x)
    tiny_timm.train()
    folded = fold_batch_norms(fuse_for_quantization(tiny_timm, relu6="keep"))
    assert tiny_timm.training and not folded.training
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-4)  # BN folded from the running statistics
        torch.testing.assert_close(tiny_timm.eval()(x), ref, rtol=0, atol=0)
    trainable = {n: p.requires_grad for n, p in folded.named_parameters()}
    assert trainable and all(trainable.values()), trainable  # the biases that carry BN's shift train too


def test_nhwc_fused_fake_quantize_is_bitwise_the_parent_without_the_copy():
    """Channels-last activations: the NHWC view gives torch.ao's output, gradient and statistics, with no NCHW copy."""
    from torch.ao.quantization import (
        FusedMovingAvgObsFakeQuantize,
        MovingAverageMinMaxObserver,
    )
    from torch.profiler import ProfilerActivity, profile

    from lightning_eff.compression.quantization.fx import NHWCFusedFakeQuantize

    kwargs = dict(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, reduce_range=True)
    parent, nhwc = FusedMovingAvgObsFakeQuantize(**kwargs), NHWCFusedFakeQuantize(**kwargs)
    assert list(parent.state_dict()) == list(nhwc.state_dict())
    torch.manual_seed(0)
    for _ in range(3):  # the moving averages advance identically
        x = torch.randn(4, 24, 6, 6).to(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = parent(xa), nhwc(xb)
        grad = torch.randn_like(out_a)
        out_a.backward(grad)
        out_b.backward(grad)
        assert torch.equal(out_a, out_b) and torch.equal(xa.grad, xb.grad)
        assert out_b.is_contiguous(memory_format=torch.channels_last)
        for key, value in parent.state_dict().items():
            assert torch.equal(value, nhwc.state_dict()[key]), key
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        nhwc(x)
    assert not any(e.name in ("aten::contiguous", "aten::copy_") for e in prof.events())
    parent(x)  # the same observer step as the profiled call
    nchw = torch.randn(4, 24, 6, 6)
    torch.testing.assert_close(nhwc(nchw), parent(nchw), rtol=0, atol=0)  # other layouts: the parent's path
    scripted = torch.jit.script(copy.deepcopy(nhwc))  # a scripted fake-quant graph (TorchScript has no super())
    torch.testing.assert_close(scripted(x), copy.deepcopy(nhwc)(x), rtol=0, atol=0)


def test_qat_qconfig_uses_the_nhwc_fake_quantize():
    from lightning_eff.compression.quantization.fx import (
        NHWCFusedFakeQuantize,
        prepare_qat_fx_model,
    )

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    prepared = prepare_qat_fx_model(net.train(), (torch.randn(2, 1, 8, 8),), engine="x86", per_channel=False)
    assert any(type(m) is NHWCFusedFakeQuantize for m in prepared.modules())
