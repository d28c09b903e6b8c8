"""Structured channel removal on MobileNetV2 and the compressed sparse artifact."""
from __future__ import annotations

import io

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_eff.callbacks.pruning import Pruning
from lightning_eff.compression.pruning import (
    compact,
    find_channel_groups,
    load_sparse,
    load_sparse_state_dict,
    prune,
    prune_channels,
    save_sparse,
    sparse_state_dict,
)
from lightning_eff.compression.pruning.structured import group_masks
from lightning_eff.errors import ConfigError
from lightning_eff.infra.footprint import count_macs, count_parameters
from lightning_eff.models import create_model
from lightning_eff.tasks import ClassificationTask

torch.set_num_threads(1)


def _mobilenet():
    torch.manual_seed(0)
    net = create_model("mobilenetv2_tiny")
    # non-trivial BN statistics, so a wrong slice would show in the outputs
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_groups_of_mobilenetv2():
    net = _mobilenet()
    groups = find_channel_groups(net)
    blocks = [n for n, m in net.named_modules() if type(m).__name__ == "InvertedResidual"]
    assert [g.name for g in groups] == blocks + ["head"]
    g = groups[0]
    assert g.producer == f"{g.name}.conv_pw.weight"
    assert (f"{g.name}.conv_pwl.weight", 1) in g.members and (f"{g.name}.bn2.bias", 0) in g.members


def test_removing_all_zero_channels_preserves_outputs():
    net = _mobilenet()
    groups = find_channel_groups(net)
    params = dict(net.named_parameters())
    gen = torch.Generator().manual_seed(1)
    keep = {g.name: torch.rand(g.channels, generator=gen) > 0.4 for g in groups}
    with torch.no_grad():
        for name, mask in group_masks(groups, keep, params).items():
            params[name].mul_(mask)
    x = torch.randn(4, 1, 32, 32)
    small = compact(net)
    assert count_parameters(small) < 0.75 * count_parameters(net)
    assert count_macs(small, x[:1]) < count_macs(net, x[:1])
    for g in find_channel_groups(small):
        assert g.channels == int(keep[g.name].sum())
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="unknown channel group 'nope'"):
        compact(net, keep={"nope": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ConfigError, match=r"has 3 entries"):
        compact(net, keep={groups[0].name: torch.ones(3, dtype=torch.bool)})


def test_prune_channels_halves_groups_and_rounds():
    net = _mobilenet()
    before = {g.name: g.channels for g in find_channel_groups(net)}
    small = prune_channels(net, 0.5)
    after = {g.name: g.channels for g in find_channel_groups(small)}
    assert all(after[k] == before[k] - int(0.5 * before[k]) for k in before)
    rounded = prune_channels(net, 0.5, round_to=8)
    assert all(g.channels % 8 == 0 for g in find_channel_groups(rounded))
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="no recognised channel groups"):
        prune_channels(torch.nn.Sequential(torch.nn.Linear(3, 3)), 0.5)


def test_channel_pruning_callback_exports_compact_model(tmp_path):
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)), batch_size=8)
    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}, scheduler="constant")
    pruning = Pruning(amount=0.5, schedule="constant", granularity="channel", distribution="uniform",
                      include=[r"blocks\..*\.conv_pw", "conv_head"], export_sparse=None)
    L.Trainer(max_epochs=1, callbacks=[pruning], logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=str(tmp_path)).fit(task, data)
    (name, small), = pruning.deployable_models().items()
    assert name == "pruned_compact"
    dense = task.model.cpu().eval()
    assert count_parameters(small) < 0.6 * count_parameters(dense)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), dense(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ compressed artifact
def _dense_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


def test_sparse_artifact_roundtrip_and_size(tmp_path):
    net = create_model("mobilenetv2", width=0.5)
    prune(net, 0.9)
    state = net.state_dict()
    path = save_sparse(net, tmp_path / "m.pt")
    assert path.stat().st_size <= 0.25 * _dense_bytes(state)
    restored = load_sparse(path)
    assert restored.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(restored[k], v), k
    fresh = load_sparse(path, create_model("mobilenetv2", width=0.5))
    assert torch.equal(fresh.conv_head.weight, net.conv_head.weight)
    torch.load(path, weights_only=True)  # plain tensors and an index of strings/ints


def test_sparse_artifact_int8_and_fp16_values():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * (torch.rand(32, 64) > 0.8)
    state = {"w": w, "b": torch.randn(32), "n": torch.tensor(7)}
    for values, tol in (("fp16", 1e-2), ("int8", None)):
        out = load_sparse_state_dict(sparse_state_dict(state, values))
        assert bool((out["w"][w == 0] == 0).all())  # pruned zeros stay exactly zero
        assert torch.equal(out["b"], state["b"]) and int(out["n"]) == 7
        if tol is None:
            step = w.abs().amax(dim=1, keepdim=True) / 127
            assert torch.all((out["w"] - w).abs() <= step / 2 + 1e-7)
        else:
            torch.testing.assert_close(out["w"], w, atol=tol, rtol=tol)
    with pytest.raises(ConfigError, match="values='int4'"):
        sparse_state_dict(state, "int4")
    with pytest.raises(ConfigError, match="not a lightning_eff.sparse"):
        load_sparse_state_dict({"format": "other"})
