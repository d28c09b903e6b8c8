"""Compile and channels-last: callbacks that train like eager/NCHW, frozen and NHWC TorchScript exports that load
back and agree, the report's extra latency columns, and the refused options."""
from __future__ import annotations

import copy
import json
import zipfile

import lightning as L
import pytest
import torch
from torch import nn
from user_module import UserData, UserModule, user_trainer

from lightning_eff.callbacks import ChannelsLast, Compile, Export, Pruning
from lightning_eff.errors import ConfigError
from lightning_eff.export.torchscript import export_torchscript
from lightning_eff.report import _layout_latencies
from lightning_eff.training.layout import (
    ChannelsLastInput,
    compile_network,
    is_compiled,
    nchw_batchnorm_backward,
    out_of_place_activations,
    slow_channels_last_batchnorm,
    to_channels_last,
    uncompile_network,
)

CL = torch.channels_last
REROUTED = "_NCHWBackwardBatchNormBackward"


def _fit(tmp_path, callbacks):
    L.seed_everything(0, verbose=False)
    module = UserModule()
    user_trainer(tmp_path, callbacks, max_epochs=1).fit(module, datamodule=UserData())
    return module


def test_compile_in_place_keeps_names_and_undoes():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    keys = list(net.state_dict())
    assert compile_network(net, backend="eager") is net and is_compiled(net)
    assert list(net.state_dict()) == keys  # no _orig_mod. prefix
    assert net(torch.randn(1, 1, 5, 5)).shape == (1, 2, 3, 3)
    uncompile_network(net)
    assert not is_compiled(net)


@pytest.mark.parametrize("opts,match", [({"backend": "inductorr"}, "backend='inductorr'.*Did you mean 'inductor'"),
                                        ({"mode": "fastest"}, "mode='fastest'"),
                                        ({"fullgraph": "yes"}, "fullgraph")])
def test_compile_bad_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        Compile(**opts)


def test_compile_callback_trains_like_eager_with_pruning(tmp_path):
    eager = _fit(tmp_path / "a", [Pruning(amount=0.5, include=["conv2"], module_attr="net")])
    compiled = _fit(tmp_path / "b", [Compile(backend="eager", module_attr="net"),
                                     Pruning(amount=0.5, include=["conv2"], module_attr="net")])
    assert not is_compiled(compiled.net)  # back to eager once training ends
    for (k, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=k)


def test_channels_last_callback_trains_nhwc_and_matches_nchw(tmp_path):
    seen = []
    cl = ChannelsLast(module_attr="net")
    L.seed_everything(0, verbose=False)
    module = UserModule()
    module.net.conv2.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    user_trainer(tmp_path / "b", [cl], max_epochs=1).fit(module, datamodule=UserData())
    assert seen and all(seen)  # activations really NHWC inside the network
    plain = _fit(tmp_path / "a", [])
    for (k, a), (_, b) in zip(plain.state_dict().items(), module.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)  # other summation order, same math


def test_to_channels_last_keeps_parameter_objects():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    weight = net[0].weight
    handle = to_channels_last(net)
    assert net[0].weight is weight and weight.is_contiguous(memory_format=torch.channels_last)
    handle.remove()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("freeze,channels_last", [(True, False), (True, True), (False, True)])
def test_frozen_and_channels_last_torchscript(tmp_path, freeze, channels_last):
    net = _net()
    x = torch.randn(4, 1, 12, 12)
    path = export_torchscript(net, (x[:1],), tmp_path / "m.pt", method="trace", freeze=freeze, channels_last=channels_last)
    loaded = torch.jit.load(str(path))
    torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-5)
    graph = str(loaded.graph) if not freeze else str(loaded.forward.graph)
    if freeze:
        assert "batch_norm" not in graph  # folded into the convolutions
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("lightning_eff.json"))))
    assert meta["frozen"] is freeze and meta["channels_last"] is channels_last


def test_export_callback_freeze_option(tmp_path):
    export = Export(formats=["pt"], freeze=True, channels_last=True, latency=False, verify_examples=4, module_attr="net")
    _fit(tmp_path, [export])
    (art,) = export.artifacts()
    assert art["verified"] is True and art["format"] == "pt"
    with pytest.raises(ConfigError, match="freeze"):
        Export(freeze="yes")


def test_report_layout_columns():
    net = _net()
    out = _layout_latencies("fp32", net, torch.randn(1, 1, 12, 12), [1], {"compile": "eager", "channels_last": True},
                            warmup=1, repeats=2)
    assert out["latency_ms_b1_compiled"] > 0 and out["latency_ms_b1_channels_last"] > 0
    assert _layout_latencies("fp32", net, torch.randn(1, 1, 12, 12), [1], {}, warmup=1, repeats=1) == {}
    with pytest.raises(ConfigError, match="report.compile"):
        _layout_latencies("fp32", net, torch.randn(1, 1, 12, 12), [1], {"compile": 3}, warmup=1, repeats=1)


def test_channels_last_input_wrapper_converts():
    wrapped = ChannelsLastInput(_net())
    assert wrapped.module[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert wrapped(torch.randn(2, 1, 12, 12)).shape == (2, 3)


def test_channels_last_only_while_training_or_evaluating(tmp_path):
    seen = []
    module = UserModule()
    module.net.conv2.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    trainer = user_trainer(tmp_path, [ChannelsLast(module_attr="net")])
    trainer.validate(module, datamodule=UserData())
    assert seen and all(seen)  # NHWC during the validation of its own
    assert module.net.conv.weight.is_contiguous() and not module.net._forward_pre_hooks  # NCHW after it


@pytest.fixture
def two_threads():
    """The slow channels-last kernel is a multi-thread effect (tests run single-threaded: tests/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_slow_channels_last_batchnorm_rule():
    assert [c for c in range(1, 70) if slow_channels_last_batchnorm(c, threads=2)] == [*range(1, 16), *range(17, 32)]
    assert not any(slow_channels_last_batchnorm(c, threads=1) for c in range(1, 70))  # one thread: no false sharing


def test_one_thread_keeps_atens_kernel():
    net = _bn_net((8,))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert to_channels_last(net) is not None  # hooked (the thread count is read at every call) ...
        assert not _bn_grad_fns(net, torch.randn(2, 3, 6, 6))[0].startswith(REROUTED)  # ... but one thread: ATen's
    finally:
        torch.set_num_threads(before)


def _bn_net(channels=(8, 24, 16)) -> nn.Module:
    torch.manual_seed(0)
    layers, c_in = [], 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 4))


def _bn_grad_fns(net: nn.Module, x: torch.Tensor) -> list[str]:
    names = []
    hooks = [m.register_forward_hook(lambda m, a, out: names.append(out.grad_fn.name() if out.grad_fn else None))
             for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return names


def test_nchw_batchnorm_backward_matches_channels_last_kernel(two_threads):
    """8 and 24 channels rerouted (16 not); same forward, same running statistics, gradients to float rounding."""
    x = torch.randn(6, 3, 10, 10)
    fixed, native = _bn_net(), _bn_net()
    handle = to_channels_last(fixed)
    to_channels_last(native, batchnorm_backward="native")
    assert len(handle) == 1 + 2 * 2  # the input hook, then a pre- and a post-hook on each of BN(8) and BN(24)
    names = _bn_grad_fns(fixed, x)
    assert [n.startswith(REROUTED) for n in names] == [True, True, False]
    assert not any(n.startswith(REROUTED) for n in _bn_grad_fns(native, x))
    for _ in range(2):  # two steps: the running statistics and num_batches_tracked advance identically
        out_f, out_n = fixed(x), native(x)
        torch.testing.assert_close(out_f, out_n, rtol=0, atol=0)
        out_f.square().sum().backward()
        out_n.square().sum().backward()
    for (k, a), (_, b) in zip(fixed.named_parameters(), native.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=k)
    for (k, a), (_, b) in zip(fixed.named_buffers(), native.named_buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    xin = x.to(memory_format=CL).requires_grad_()
    fixed[1](fixed[0](xin)).sum().backward()
    assert xin.grad.is_contiguous(memory_format=CL)  # the gradient comes back in the network's layout


def test_nchw_batchnorm_backward_double_backward_and_untouched_paths(two_threads):
    fixed, native = _bn_net((8,)), _bn_net((8,))
    nchw_batchnorm_backward(fixed.to(memory_format=CL))
    native.to(memory_format=CL)
    x = torch.randn(4, 3, 6, 6).to(memory_format=CL)
    grads = []
    for net in (fixed, native):  # a gradient penalty: the rerouted backward is itself differentiable
        xin = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(net(xin).square().sum(), xin, create_graph=True)
        g.square().sum().backward()
        grads.append(net[0].weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    bn = fixed[1]
    y = fixed[0](x)
    assert bn(y.contiguous()).grad_fn.name() == "NativeBatchNormBackward0"  # NCHW input: ATen's own path
    assert bn(y.bfloat16()).grad_fn.name() == "NativeBatchNormBackward0"  # other dtypes too
    fixed.eval()
    assert bn(y).grad_fn.name() == "NativeBatchNormBackward0"  # evaluation: running statistics
    fixed.train()
    with torch.no_grad():
        assert bn(y).grad_fn is None
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # F.batch_norm's own check still runs
        bn(torch.randn(1, 8, 1, 1).to(memory_format=CL))


def test_nchw_batchnorm_backward_copies_remove_and_export(two_threads):
    net = _bn_net((8,))
    keys = list(net.state_dict())
    handle = to_channels_last(net)
    x = torch.randn(2, 3, 6, 6)
    clone = copy.deepcopy(net)
    assert _bn_grad_fns(clone, x)[0].startswith(REROUTED)  # a copy (QAT prepare, EMA, the teacher) keeps it
    assert list(net.state_dict()) == keys
    traced = torch.jit.trace(net.eval(), x)  # tracing/export see the plain module
    torch.testing.assert_close(traced(x), net(x))
    handle.remove()
    net.train()
    assert not _bn_grad_fns(net, x)[0].startswith(REROUTED)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())


def test_nchw_batchnorm_backward_reaches_timm_and_qat_batchnorms(two_threads):
    import timm

    from lightning_eff.compression.quantization.fx import prepare_qat_fx_model
    from lightning_eff.models import create_model

    net = create_model("mobilenetv2", width=0.5, num_classes=3, in_chans=1, small_input_stages=1)
    bn8 = [m for m in net.modules() if isinstance(m, timm.layers.BatchNormAct2d) and m.num_features == 8]
    assert bn8 and nchw_batchnorm_backward(net) is not None
    x = torch.randn(4, 1, 16, 16)
    seen = []
    bn8[0].register_forward_hook(lambda m, a, out: seen.append(out.grad_fn.name()))
    net.to(memory_format=CL)(x.to(memory_format=CL))
    assert seen[-1].startswith(REROUTED)  # BatchNormAct2d's own forward (act: Identity here) calls F.batch_norm
    qat = prepare_qat_fx_model(create_model("mobilenetv2", width=0.5, num_classes=3, in_chans=1, small_input_stages=1),
                               (x[:2],), engine="x86", per_channel="depthwise")
    handle = to_channels_last(qat)
    hooked = [n for n, m in qat.named_modules() if m._forward_pre_hooks and isinstance(m, nn.BatchNorm2d)]
    assert hooked and all(n.endswith(".bn") for n in hooked)  # the BN inside a QAT Conv-BN module
    names = _bn_grad_fns(qat, x)
    assert any(n.startswith(REROUTED) for n in names)
    handle.remove()


def test_batchnorm_backward_option_refused():
    with pytest.raises(ConfigError, match="batchnorm_backward='nchw'.*choose from \\['auto', 'native'\\]"):
        ChannelsLast(batchnorm_backward="nchw")
    with pytest.raises(ConfigError, match="batchnorm_backward"):
        to_channels_last(nn.Conv2d(1, 1, 1), batchnorm_backward=True)


def test_channels_last_callback_reroutes_and_removes(tmp_path, two_threads):
    seen = []
    module = UserModule()  # UserNet's first BatchNorm has 8 channels
    module.net.bn.register_forward_hook(lambda m, a, out: seen.append(out.grad_fn.name() if out.grad_fn else None))
    user_trainer(tmp_path, [ChannelsLast(module_attr="net")], max_epochs=1).fit(module, datamodule=UserData())
    assert seen and all(n.startswith(REROUTED) for n in seen if n)
    assert not module.net.bn._forward_pre_hooks  # taken off with the layout when training ends


def test_out_of_place_activations_bitwise_same_and_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(inplace=True), nn.Conv2d(8, 8, 1), nn.SiLU(inplace=True),
                        nn.Conv2d(8, 8, 1), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 1), nn.Hardswish(inplace=False))
    ref = copy.deepcopy(net)
    handle = out_of_place_activations(net)
    assert [net[i].inplace for i in (1, 3, 5, 7)] == [False, False, True, False]  # ReLU reads its output: stays in place
    x = torch.randn(2, 3, 8, 8)
    out, out_ref = net(x), ref(x)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    assert torch.equal(out, out_ref)
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad)
    handle.remove()
    assert [net[i].inplace for i in (1, 3, 5, 7)] == [True, True, True, False]  # only what it switched goes back
    assert out_of_place_activations(nn.Sequential(nn.ReLU(inplace=True))) is None


def test_channels_last_callback_activations_out_of_place_while_training(tmp_path):
    class ActNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

        def forward(self, x):
            return self.net(x)

    module = UserModule()
    module.net = ActNet()
    seen = []
    module.net.net[2].register_forward_pre_hook(lambda m, a: seen.append(m.inplace))
    user_trainer(tmp_path, [ChannelsLast(module_attr="net")], max_epochs=1).fit(module, datamodule=UserData())
    assert seen and not any(seen) and module.net.net[2].inplace is True  # off while training, back afterwards
    with pytest.raises(ConfigError, match="inplace_activations='never'.*choose from"):
        ChannelsLast(inplace_activations="never")
