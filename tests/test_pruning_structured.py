"""Structured channel removal on MobileNetV2 and the compressed sparse artifact."""
from __future__ import annotations

import io

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
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
from lightning_eff.measure import count_macs, count_parameters
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


def _zero_random_channels(net, groups, seed, keep_prob):
    """Mask a random subset of every group's channels to exactly zero; returns the keep vectors."""
    params = dict(net.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    keep = {g.name: torch.rand(g.channels, generator=gen) > keep_prob for g in groups}
    with torch.no_grad():
        for name, mask in group_masks(groups, keep, params).items():
            params[name].mul_(mask)
    return keep


def test_groups_of_mobilenetv2():
    net = _mobilenet()
    groups = find_channel_groups(net, streams=False)
    blocks = [n for n, m in net.named_modules() if type(m).__name__ == "InvertedResidual"]
    assert [g.name for g in groups] == blocks + ["head"]
    g = groups[0]
    assert g.producer == f"{g.name}.conv_pw.weight"
    assert (f"{g.name}.conv_pwl.weight", 1) in g.members and (f"{g.name}.bn2.bias", 0) in g.members


def test_residual_stream_groups_follow_the_skip_connections():
    net = _mobilenet()
    streams = {g.name: g for g in find_channel_groups(net) if g.name.startswith("stream:")}
    # one stream per stage of timm's MobileNetV2 (blocks.0.0 adds to the stem's stream at width 0.25)
    assert list(streams) == ["stream:stem"] + [f"stream:blocks.{i}.0" for i in range(1, 7)]
    s = streams["stream:blocks.3.0"]  # 4 blocks; the last three have skips and add to the stream
    assert s.producers == [f"blocks.3.{j}.conv_pwl.weight" for j in range(4)]
    assert ("blocks.3.3.bn3.bias", 0) in s.members and ("blocks.3.2.conv_pw.weight", 1) in s.members
    assert ("blocks.4.0.conv_pw.weight", 1) in s.members  # the next stage reads it
    assert ("blocks.3.0.conv_pw.weight", 1) not in s.members  # the stage's first block reads the previous stream
    assert ("conv_head.weight", 1) in streams["stream:blocks.6.0"].members


@pytest.mark.parametrize("arch", ["mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0"])
def test_stream_pruning_preserves_outputs_on_timm_families(arch):
    import timm

    torch.manual_seed(0)
    net = timm.create_model(arch, num_classes=10).eval()
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    groups = [g for g in find_channel_groups(net) if g.name.startswith("stream:")]
    assert len(groups) >= 6
    keep = _zero_random_channels(net, groups, seed=2, keep_prob=0.5)
    x = torch.randn(2, 3, 64, 64)
    small = compact(net, groups, keep)
    assert count_parameters(small) < 0.9 * count_parameters(net)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-4, atol=1e-4)


def test_removing_all_zero_channels_preserves_outputs():
    net = _mobilenet()
    groups = find_channel_groups(net)
    keep = _zero_random_channels(net, groups, seed=1, keep_prob=0.4)
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
    assert after.keys() == before.keys() and any(k.startswith("stream:") for k in after)
    assert all(after[k] == before[k] - int(0.5 * before[k]) for k in before)
    blocks_only = prune_channels(net, 0.5, streams=False)
    assert blocks_only.conv_stem.out_channels == net.conv_stem.out_channels
    assert count_parameters(small) < count_parameters(blocks_only) < count_parameters(net)
    rounded = prune_channels(net, 0.5, round_to=8)
    assert all(g.channels % 8 == 0 for g in find_channel_groups(rounded))
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="no recognised channel groups"):
        prune_channels(torch.nn.Sequential(torch.nn.Linear(3, 3)), 0.5)


@pytest.mark.parametrize("include", [[r"blocks\..*\.conv_pw", "conv_head"],
                                     [r"blocks\..*\.conv_pw", "conv_head", "conv_stem", r"blocks\..*\.conv_pwl"]],
                         ids=["expansion", "with_streams"])
def test_channel_pruning_callback_exports_compact_model(tmp_path, include):
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)), batch_size=8)
    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}, scheduler="constant")
    pruning = Pruning(amount=0.5, schedule="constant", granularity="channel", distribution="uniform",
                      include=include, export_sparse=None)
    L.Trainer(max_epochs=1, callbacks=[pruning], logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=str(tmp_path)).fit(task, data)
    (name, small), = pruning.deployable_models().items()
    assert name == "pruned_compact"
    dense = task.model.cpu().eval()
    assert count_parameters(small) < (0.4 if "conv_stem" in include else 0.6) * count_parameters(dense)
    # a stream is pruned only when one of its producers is selected (conv_pwl here)
    stream_out = [b for b in ("blocks.2.0", "blocks.3.0", "blocks.4.0") if small.get_submodule(b).conv_pwl.out_channels
                  < dense.get_submodule(b).conv_pwl.out_channels]
    assert bool(stream_out) == ("conv_stem" in include)
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


# ------------------------------------------------------------------ channels removed while training
STREAMS_AND_BLOCKS = [r"blocks\..*\.conv_pw", "conv_head", "conv_stem", r"blocks\..*\.conv_pwl"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_compact_training_continues_the_masked_trajectory(optimizer):
    """Removing masked channels mid-training (optimizer state sliced along) changes nothing but the shapes."""
    import copy

    import torch.nn.functional as F

    from lightning_eff.compression.pruning import (
        Pruner,
        PruningConfig,
        compact_training,
    )
    from lightning_eff.compression.pruning.structured import channel_keep, slice_like

    torch.manual_seed(0)
    net = create_model("mobilenetv2_tiny").double().train()  # float64: float32 rounding differences grow chaotically

    def make_opt(model):
        if optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)

    x, y = torch.randn(16, 1, 16, 16, dtype=torch.float64), torch.randint(0, 10, (16,))
    pruner = Pruner(PruningConfig(amount=0.5, schedule="constant", granularity="channel", distribution="uniform",
                                  include=STREAMS_AND_BLOCKS))
    pruner.attach(net, 10)
    opt = make_opt(net)

    def step(model, o, p=None):
        o.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if p is not None:
            p.before_optimizer_step(0, [o])
        o.step()
        if p is not None:
            p.after_optimizer_step()

    step(net, opt)
    pruner.update(0.5, [opt])
    step(net, opt, pruner)
    small = copy.deepcopy(net)
    small_opt = make_opt(small)
    small_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    groups = find_channel_groups(small)
    slices = compact_training(small, groups, channel_keep(groups, small, pruner.masks), [small_opt])
    assert count_parameters(small) < 0.4 * count_parameters(net)
    assert all(p in small_opt.state for p in small.parameters())
    for _ in range(3):
        step(net, opt, pruner)
        step(small, small_opt)
    big = dict(net.named_parameters())
    for name, p in small.named_parameters():
        torch.testing.assert_close(p.detach(), slice_like(big[name].detach(), slices.get(name, [])), rtol=1e-5, atol=1e-6)


def _compacting_fit(tmp_path, max_epochs, ckpt_path=None):
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)), batch_size=8)
    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}, scheduler="constant", optimizer="adamw")
    pruning = Pruning(amount=0.5, schedule="polynomial", frequency=2, end_step=5, granularity="channel", distribution="uniform",
                      include=STREAMS_AND_BLOCKS, export_sparse=None, compact_during_fit=True)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True, filename="{epoch}")
    L.Trainer(max_epochs=max_epochs, callbacks=[pruning, ckpt], logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(tmp_path), deterministic=True).fit(task, data, ckpt_path=ckpt_path)
    return task, pruning


def test_compact_during_fit_shrinks_the_live_model_and_resumes_exactly(tmp_path):
    full_task, full = _compacting_fit(tmp_path / "full", 3)  # 4 steps per epoch; schedule ends at step 5
    dense = create_model("mobilenetv2_tiny")
    assert count_parameters(full_task.model) < 0.4 * count_parameters(dense)
    assert full._compacted and full.deployable_models() == {}
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():  # the exported copy is the live model
        torch.testing.assert_close(full.finalize(full_task)(x), full_task.model.cpu().eval()(x))
    _compacting_fit(tmp_path / "part", 2)
    for epoch in (0, 1):  # before and after the channels were removed
        state = torch.load(tmp_path / "part" / "ckpt" / f"epoch={epoch}.ckpt", weights_only=True)
        assert (next(v for k, v in state["callbacks"].items() if k.startswith("Pruning"))["compacted"] is None) == (epoch == 0)
        resumed_task, _ = _compacting_fit(tmp_path / f"resume{epoch}", 3, ckpt_path=str(tmp_path / "part" / "ckpt" / f"epoch={epoch}.ckpt"))
        for (k, a), (_, b) in zip(full_task.state_dict().items(), resumed_task.state_dict().items()):
            assert torch.equal(a.cpu(), b.cpu()), (epoch, k)
    # outside fit: compact a fresh full-size model from the checkpoint, then its weights load
    fresh = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1})
    assert Pruning(amount=0.5, granularity="channel", include=STREAMS_AND_BLOCKS, compact_during_fit=True).restore_compaction(fresh, state)
    fresh.load_state_dict(state["state_dict"])


def test_compact_during_fit_bad_options():
    with pytest.raises(ConfigError, match="compact_during_fit=True needs granularity='channel'"):
        Pruning(amount=0.5, granularity="unstructured", compact_during_fit=True)
    with pytest.raises(ConfigError, match="regrowth='rigl'"):
        Pruning(amount=0.5, schedule="constant", granularity="channel", regrowth="rigl", compact_during_fit=True)
    from types import SimpleNamespace

    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1})
    with pytest.raises(ConfigError, match="not supported with 2 processes"):
        Pruning(amount=0.5, granularity="channel", compact_during_fit=True).setup(SimpleNamespace(world_size=2), task, "fit")
