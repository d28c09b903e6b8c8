"""Names that survive wrappers: torch.compile (``_orig_mod.``), activation-checkpoint wrappers
(``_checkpoint_wrapped_module.``) and DDP (``module.``) must not change what a technique selects,
stores or reports — including resume from a checkpoint written with the wrapper and loaded without
it, and the reverse."""
from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)
from user_module import UserData, UserModule, UserNet, user_trainer

from lightning_eff.callbacks import Distillation, Pruning, QuantizationAwareTraining
from lightning_eff.compression.pruning.config import PruningConfig
from lightning_eff.compression.pruning.pruner import Pruner
from lightning_eff.measure import (
    count_macs,
    count_nonzero_parameters,
    count_parameters,
    measure_footprint,
)
from lightning_eff.naming import (
    canonical_name,
    float_state_dict,
    remap_keys,
    unwrap_model,
)
from lightning_eff.surgery import ModuleSelector, get_submodule, set_submodule


def compiled(net: nn.Module) -> nn.Module:
    return torch.compile(net, backend="eager")  # the wrapper and its names, without a C++ build


def ckpt_wrapped(net: nn.Module) -> nn.Module:
    net.conv2 = checkpoint_wrapper(net.conv2)
    return net


WRAPPERS = {"compile": compiled, "checkpoint": ckpt_wrapped}


def _plain_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {canonical_name(k): v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_wrapper_names_are_canonical(wrap):
    net = WRAPPERS[wrap](UserNet())
    names = [n for n, _ in net.named_parameters()]
    assert any(p in n for n in names for p in ("_orig_mod.", "_checkpoint_wrapped_module."))
    assert sorted(canonical_name(n) for n in names) == sorted(n for n, _ in UserNet().named_parameters())
    assert get_submodule(net, "conv2") is not None and isinstance(unwrap_model(compiled(UserNet())), UserNet)
    sel = ModuleSelector(include=["conv2?"], types=["Conv2d"])
    assert sorted(canonical_name(n) for n, _ in sel.select(net)) == ["conv", "conv2"]
    set_submodule(net, "fc", nn.Linear(16, 3))
    assert unwrap_model(net).fc.out_features == 3


def test_remap_keys_both_directions():
    plain = UserNet().state_dict()
    wrapped = compiled(UserNet()).state_dict()
    assert set(remap_keys(wrapped, plain.keys())) == set(plain)
    assert set(remap_keys(plain, wrapped.keys())) == set(wrapped)
    assert remap_keys({"nothing.like.it": 1}, plain.keys()) == {"nothing.like.it": 1}


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_footprint_report_unchanged_under_wrappers(wrap):
    torch.manual_seed(0)
    plain = UserNet().eval()
    wrapped = WRAPPERS[wrap](copy.deepcopy(plain)).eval()
    x = torch.randn(1, 1, 12, 12)
    assert count_parameters(wrapped) == count_parameters(plain)
    assert count_nonzero_parameters(wrapped) == count_nonzero_parameters(plain)
    assert count_macs(wrapped, x) == count_macs(plain, x)
    a = measure_footprint(plain, x, latency=False, memory=False)
    b = measure_footprint(wrapped, x, latency=False, memory=False)
    assert {k: a[k] for k in ("params", "nonzero_params", "macs")} == {k: b[k] for k in ("params", "nonzero_params", "macs")}


def test_pruner_state_binds_across_ddp_wrapper():
    """The functional core under DDP (``module.``): masks saved from the wrapped net bind to the plain one."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = UserNet()
        ddp = nn.parallel.DistributedDataParallel(net)
        pruner = Pruner(PruningConfig(amount=0.5, schedule="constant"))
        selected = pruner.attach(ddp, total_steps=1)
        assert all(k.startswith("module.") for k in selected)
        pruner.update(0.5)
        state = pruner.state_dict()
        assert state["masks"] and not any(k.startswith("module.") for k in state["masks"])
    finally:
        dist.destroy_process_group()
    again = Pruner(PruningConfig(amount=0.5, schedule="constant"))
    again.load_state_dict(state)
    again.attach(copy.deepcopy(net), total_steps=1)
    assert set(again.masks) == set(state["masks"])
    assert all(torch.equal(again.masks[k].cpu(), state["masks"][k]) for k in state["masks"])


class _StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _fit_pruned(root, wrap_first, wrap_second, resume: bool):
    """Two epochs of pruning; with ``resume`` the second epoch runs in a new process-like Trainer from the
    first epoch's checkpoint, the network wrapped by ``wrap_second`` (``None`` = plain)."""
    torch.manual_seed(0)
    m = UserModule()
    if wrap_first:
        m.net = WRAPPERS[wrap_first](m.net)
    def pruning():
        return Pruning(amount=0.5, schedule="polynomial", frequency=1, module_attr="net")
    if not resume:
        trainer = user_trainer(root, [pruning()], max_epochs=2)
        trainer.fit(m, datamodule=UserData())
        return m, trainer.callbacks[0]
    p = pruning()
    trainer = user_trainer(root, [p, _StopAfterFirstEpoch()], max_epochs=2)  # same schedule length as the reference
    trainer.fit(m, datamodule=UserData())
    path = f"{root}/epoch1.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    masks = next(v for k, v in ckpt["callbacks"].items() if "Pruning" in k)["masks"]
    assert masks and not any("_orig_mod" in k or "_checkpoint_wrapped" in k for k in masks)
    torch.manual_seed(1)  # a different init: everything must come from the checkpoint
    m2 = UserModule()
    if wrap_second:
        m2.net = WRAPPERS[wrap_second](m2.net)
    p2 = pruning()
    trainer = user_trainer(root, [p2], max_epochs=2)
    trainer.fit(m2, datamodule=UserData(), ckpt_path=path)
    return m2, p2


@pytest.mark.parametrize("first, second", [("compile", None), (None, "compile"), ("checkpoint", None), (None, "checkpoint")])
def test_pruning_resume_across_wrappers(tmp_path, first, second):
    reference, ref_cb = _fit_pruned(tmp_path / "ref", None, None, resume=False)
    resumed, cb = _fit_pruned(tmp_path / "res", first, second, resume=True)
    want, got = _plain_weights(reference), _plain_weights(resumed)
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    ref_masks = {canonical_name(k): v for k, v in ref_cb.pruner.masks.items()}
    masks = {canonical_name(k): v for k, v in cb.pruner.masks.items()}
    assert set(masks) == set(ref_masks) and all(torch.equal(masks[k], ref_masks[k]) for k in masks)
    assert 0.2 < sum(int((~v).sum()) for v in masks.values()) / sum(v.numel() for v in masks.values())


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_distillation_layers_found_under_wrappers(tmp_path, wrap):
    torch.manual_seed(0)
    teacher = UserNet().eval()
    m = UserModule()
    m.net = WRAPPERS[wrap](m.net)
    kd = Distillation(teacher=teacher, layers={"conv2": "conv2"}, module_attr="net")
    trainer = user_trainer(tmp_path, [kd], max_steps=2)
    trainer.fit(m, datamodule=UserData())  # a layer whose hook never fired is a ConfigError at the first step
    assert float(trainer.callback_metrics["distill/mse/conv2"]) > 0


@pytest.mark.parametrize("wrap", WRAPPERS)
def test_qat_bookkeeping_under_wrappers(tmp_path, wrap):
    torch.manual_seed(0)
    m = UserModule()
    m.net = WRAPPERS[wrap](m.net)
    qat = QuantizationAwareTraining(engines=["x86"], module_attr="net")
    user_trainer(tmp_path, [qat], max_steps=2).fit(m, datamodule=UserData())
    assert isinstance(m.net, torch.fx.GraphModule)
    assert set(float_state_dict(m.net)) == set(UserNet().state_dict())
    assert "qat_int8_x86" in qat.deployable_models()


def test_export_ships_the_network_inside_a_compile_wrapper(tmp_path):
    from lightning_eff.callbacks import Export

    torch.manual_seed(0)
    m = UserModule()
    m.net = compiled(m.net)
    export = Export(formats=["pt"], module_attr="net", latency=False, output_dir=str(tmp_path / "art"))
    user_trainer(tmp_path, [export], max_steps=1).fit(m, datamodule=UserData())
    (entry,) = [a for a in export.artifacts() if a["variant"] == "fp32"]
    assert entry["verified"] is True and (tmp_path / "art" / "fp32.pt").is_file()


def _fit_resumed(root, make_callback, wrap_first, wrap_second):
    """Epoch 1 with the network wrapped by ``wrap_first``, a checkpoint, epoch 2 in a new Trainer with ``wrap_second``."""
    torch.manual_seed(0)
    m = UserModule()
    if wrap_first:
        m.net = WRAPPERS[wrap_first](m.net)
    trainer = user_trainer(root, [make_callback(), _StopAfterFirstEpoch()], max_epochs=2)
    trainer.fit(m, datamodule=UserData())
    path = f"{root}/epoch1.ckpt"
    trainer.save_checkpoint(path)
    torch.manual_seed(1)
    m2 = UserModule()
    if wrap_second:
        m2.net = WRAPPERS[wrap_second](m2.net)
    user_trainer(root, [make_callback()], max_epochs=2).fit(m2, datamodule=UserData(), ckpt_path=path)
    return m2


def _teacher() -> nn.Module:
    torch.manual_seed(3)
    return UserNet().eval()


RESUMABLE = {
    "qat": lambda: QuantizationAwareTraining(engines=["x86"], module_attr="net"),
    "distillation": lambda: Distillation(teacher=_teacher(), layers={"conv2": "conv2"}, module_attr="net"),
}


@pytest.mark.parametrize("technique", RESUMABLE)
@pytest.mark.parametrize("first, second", [("compile", None), (None, "compile")])
def test_qat_and_distillation_resume_across_a_compile_wrapper(tmp_path, technique, first, second):
    torch.manual_seed(0)
    reference = UserModule()
    user_trainer(tmp_path / "ref", [RESUMABLE[technique]()], max_epochs=2).fit(reference, datamodule=UserData())
    resumed = _fit_resumed(tmp_path / "res", RESUMABLE[technique], first, second)
    want, got = _plain_weights(reference), _plain_weights(resumed)
    assert set(want) == set(got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
