"""Compile and channels-last: callbacks that train like eager/NCHW, frozen and NHWC TorchScript exports that load
back and agree, the report's extra latency columns, and the refused options."""
from __future__ import annotations

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
    to_channels_last,
    uncompile_network,
)


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
