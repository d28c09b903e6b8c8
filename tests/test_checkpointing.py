"""Activation checkpointing: same gradients (also with dropout), state updated once, every parameter a gradient,
less saved activation memory, the model's own switch, FX graphs (QAT), hooks, and the refused combinations."""
from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from user_module import UserData, UserModule, user_trainer

from lightning_eff.callbacks import (
    ActivationCheckpointing,
    Distillation,
    Pruning,
    QuantizationAwareTraining,
)
from lightning_eff.errors import ConfigError, NoEffectWarning
from lightning_eff.measure import saved_activation_bytes
from lightning_eff.models import create_model
from lightning_eff.naming import canonical_name
from lightning_eff.training.checkpointing import (
    apply_activation_checkpointing,
    auto_blocks,
    is_recomputing,
    remove_activation_checkpointing,
)


def _step(net: nn.Module, x, seed: int = 7) -> None:
    for p in net.parameters():
        p.grad = None
    torch.manual_seed(seed)  # the same dropout masks in both nets
    out = net(**x) if isinstance(x, dict) else net(x)
    out.float().pow(2).mean().backward()


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {canonical_name(n): p.grad for n, p in net.named_parameters()}


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {canonical_name(k): v for k, v in net.state_dict().items()}


def _assert_same_step(plain: nn.Module, ckpt: nn.Module, x) -> None:
    _step(plain, x)
    _step(ckpt, x)
    g0, g1 = _grads(plain), _grads(ckpt)
    assert set(g0) == set(g1)
    missing = [n for n, g in g1.items() if g is None]
    assert not missing, f"parameters without a gradient: {missing}"
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=name)
    s0, s1 = _state(plain), _state(ckpt)
    assert set(s0) == set(s1), "state-dict keys change under checkpointing"
    for name in s0:  # BatchNorm statistics / num_batches_tracked / observers: updated exactly once
        assert torch.equal(s0[name], s1[name]), name


def test_mobilenet_blocks_with_dropout_same_gradients_bn_once_and_less_memory():
    import timm

    torch.manual_seed(0)  # dropout before the classifier and stochastic depth inside the blocks
    net = timm.create_model("mobilenetv2_050", num_classes=10, in_chans=1, drop_rate=0.3, drop_path_rate=0.2).train()
    plain = copy.deepcopy(net)
    x = torch.randn(6, 1, 28, 28)
    info = apply_activation_checkpointing(net)
    assert info.method == "wrapper" and info.modules == auto_blocks(plain) and len(info.modules) >= 3
    _assert_same_step(plain, net, x)
    _assert_same_step(plain, net, x)  # a second step: the snapshot is per step
    bn = next(m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert int(bn.num_batches_tracked) == 2
    before, after = saved_activation_bytes(plain, x), saved_activation_bytes(net, x)
    assert after["saved_bytes"] <= 0.5 * before["saved_bytes"], (before, after)
    remove_activation_checkpointing(net)
    assert not any(type(m).__name__ == "CheckpointWrapper" for m in net.modules())


def test_transformers_switch_used_and_gradients_equal_with_dropout():
    torch.manual_seed(0)
    net = create_model("bert_tiny", num_classes=5).train()  # dropout 0.1 in every layer
    plain = copy.deepcopy(net)
    x = {"input_ids": torch.randint(5, 1000, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    info = apply_activation_checkpointing(net)
    assert info.method == "transformers", info
    _assert_same_step(plain, net, x)
    remove_activation_checkpointing(net)
    hf = next(m for m in net.modules() if hasattr(m, "supports_gradient_checkpointing"))
    assert not hf.is_gradient_checkpointing


def test_timm_switch_only_without_batchnorm():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    assert apply_activation_checkpointing(vit).method == "timm" and vit.grad_checkpointing
    _assert_same_step(copy.deepcopy(vit), vit, torch.randn(2, 3, 32, 32))
    cnn = timm.create_model("mobilenetv2_050", num_classes=3)  # BatchNorm: timm's switch would update it twice
    assert apply_activation_checkpointing(cnn).method == "wrapper"
    with pytest.raises(ConfigError, match="twice"):
        apply_activation_checkpointing(timm.create_model("mobilenetv2_050", num_classes=3), use_model_switch="always")


def test_fx_qat_graph_is_segmented_exactly_and_converts_after_removal():
    from lightning_eff.compression.quantization.fx import (
        convert_fx_model,
        prepare_qat_fx_model,
    )

    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    qat = prepare_qat_fx_model(create_model("mobilenetv2_tiny", num_classes=10, in_chans=1).train(), (x,), engine="x86")
    plain = copy.deepcopy(qat)
    info = apply_activation_checkpointing(qat, segments=4)
    assert info.method == "fx-segments" and info.segments >= 2
    _assert_same_step(plain, qat, x)  # observers and fake-quant ranges: identical, so updated once
    remove_activation_checkpointing(qat)
    assert "forward" not in qat.__dict__
    int8 = convert_fx_model(copy.deepcopy(qat).eval(), engine="x86")
    assert int8(x).shape == (4, 10)


def test_selector_outermost_exclude_and_no_effect_warning():
    net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3)])
    info = apply_activation_checkpointing(net, include=[r"\d", r"\d\.0"], exclude=["2"])
    assert info.modules == ["0", "1"]  # nested 0.0 dropped (outermost kept), 2 excluded
    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(NoEffectWarning, match="no block list"):
        assert apply_activation_checkpointing(flat).modules == []


def test_hooks_see_the_recomputation_flag():
    seq = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    calls = []
    seq[0][0].register_forward_hook(lambda m, a, o: calls.append(is_recomputing()))
    apply_activation_checkpointing(seq)
    seq(torch.randn(2, 3, requires_grad=True)).sum().backward()
    assert calls == [False, True]  # the forward, then the recomputation inside backward


@pytest.mark.parametrize("opts,match", [
    ({"use_model_switch": "maybe"}, "use_model_switch"),
    ({"segments": 1}, "segments"),
    ({"include": ["("]}, "include"), ({"modules": ["("]}, "include"),
    ({"preserve_rng_state": "yes"}, "preserve_rng_state"),
])
def test_bad_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        ActivationCheckpointing(**opts)


def test_refused_combinations(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    bn_net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) for _ in range(2)])
    with pytest.raises(ConfigError, match="reentrant=True cannot restore BatchNorm"):
        apply_activation_checkpointing(bn_net, reentrant=True)
    with pytest.raises(ConfigError, match="has no checkpointing switch"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)), use_model_switch="always")
    trainer = L.Trainer(strategy=DDPStrategy(find_unused_parameters=True), accelerator="cpu", devices=1,
                        logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="find_unused_parameters"):
        ActivationCheckpointing(reentrant=True)._check_strategy(trainer)
    ActivationCheckpointing()._check_strategy(trainer)  # the non-reentrant default works with it


class BlockModule(UserModule):
    """A user's module whose network has a block list (what ``auto`` finds) and dropout."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2)),
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)),
        )


def _fit(tmp_path, callbacks, seed=0):
    L.seed_everything(seed, verbose=False)
    module = BlockModule()
    user_trainer(tmp_path, callbacks, max_epochs=1).fit(module, datamodule=UserData())
    return module


def test_callback_training_equals_plain_training_with_pruning_and_distillation(tmp_path):
    def teacher():
        torch.manual_seed(3)
        return copy.deepcopy(BlockModule().net).eval()

    def techniques():
        return [Pruning(amount=0.5, include=[r"\d\.0"], module_attr="net"),
                Distillation(teacher=teacher(), layers={"1": "1"}, module_attr="net")]

    plain = _fit(tmp_path / "a", techniques())
    ac = ActivationCheckpointing(module_attr="net")
    ckpt = _fit(tmp_path / "b", [ac, *techniques()])
    assert ac.info.modules == ["0", "1", "2", "3"]
    assert type(ckpt.net[0]) is nn.Sequential  # restored at the end of training
    for (name, a), (_, b) in zip(plain.state_dict().items(), ckpt.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("order", ["ac_first", "qat_first"])
def test_callback_with_qat_in_either_order(tmp_path, order):
    qat = QuantizationAwareTraining(engines=["x86"], module_attr="net")
    ac = ActivationCheckpointing(module_attr="net")
    module = _fit(tmp_path, [ac, qat] if order == "ac_first" else [qat, ac])
    assert ac.info.method == "fx-segments"
    assert "forward" not in module.net.__dict__
    int8 = qat.deployable_models()["qat_int8_x86"]
    assert int8(torch.randn(2, 1, 12, 12)).shape == (2, 10)


def test_memory_budget_checkpoints_fewer_blocks_and_meets_the_budget():
    import timm

    torch.manual_seed(0)
    net = timm.create_model("mobilenetv2_050", num_classes=10, in_chans=1).train()
    x = torch.randn(8, 1, 64, 64)
    plain, every = copy.deepcopy(net), copy.deepcopy(net)
    apply_activation_checkpointing(every)
    info = apply_activation_checkpointing(net, memory_budget=0.5, example_inputs=x)
    assert info.profile is not None and set(info.modules) <= set(info.profile["blocks"])
    assert 0 < len(info.modules) < len(info.profile["blocks"])  # finer candidates, only some of them
    bn = [m.num_batches_tracked.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(b) == 0 for b in bn), "profiling left BatchNorm state untouched"
    base = saved_activation_bytes(plain, x)["saved_bytes"]
    ratio = saved_activation_bytes(net, x)["saved_bytes"] / base
    assert ratio <= 0.5, ratio
    assert ratio > saved_activation_bytes(every, x)["saved_bytes"] / base  # less saved than every block: less recompute
    _assert_same_step(plain, net, x)
    with pytest.raises(ConfigError, match="memory_budget"):
        apply_activation_checkpointing(copy.deepcopy(plain), memory_budget=1.5, example_inputs=x)
    with pytest.raises(ConfigError, match="needs example_inputs"):
        apply_activation_checkpointing(copy.deepcopy(plain), memory_budget=0.5)


def test_callback_memory_budget_profiles_on_real_examples(tmp_path):
    ac = ActivationCheckpointing(memory_budget=0.6, module_attr="net")
    _fit(tmp_path, [ac])
    assert ac.info.profile is not None and ac.info.modules


def test_footprint_monitor_reports_the_real_steps_saved_activations(tmp_path):
    from lightning_eff.callbacks import FootprintMonitor

    def run(extra):
        fp = FootprintMonitor(batch_sizes=[1], latency=False, memory=False, activations=True, module_attr="net")
        _fit(tmp_path / str(len(extra)), [*extra, fp])
        return fp.report["activations"]

    plain, ckpt = run([]), run([ActivationCheckpointing(module_attr="net")])
    assert plain["saved_bytes"] > 0 and plain["peak_rss_mb"] > 0 and plain["step"] == 0
    assert ckpt["saved_bytes"] < 0.5 * plain["saved_bytes"], (plain, ckpt)
    with pytest.raises(ConfigError, match="activations"):
        FootprintMonitor(activations="yes")


def test_include_is_the_shared_selection_name_and_modules_its_old_spelling():
    with pytest.warns(FutureWarning, match="renamed include"):
        old = ActivationCheckpointing(modules=[r"blocks\.\d+"])
    assert old.include == [r"blocks\.\d+"] and old.state_key == ActivationCheckpointing(include=[r"blocks\.\d+"]).state_key
    with pytest.raises(ConfigError, match="give include only"):
        ActivationCheckpointing(include="auto", modules="auto")


def test_choose_blocks_frees_enough_memory_for_the_least_recomputation():
    import itertools
    import random

    from lightning_eff.training.checkpointing import choose_blocks

    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(2, 8)
        blocks = {f"b{i}": {"saved": rng.uniform(0, 100), "inputs": rng.uniform(0, 30), "ms": rng.uniform(0.1, 10)}
                  for i in range(n)}
        total = sum(b["saved"] for b in blocks.values()) + rng.uniform(0, 50)
        budget = rng.uniform(0.2, 0.9)
        need = total * (1 - budget)
        chosen = choose_blocks({"blocks": blocks, "total_saved": total}, budget)

        def freed(names, blocks=blocks):
            return sum(blocks[b]["saved"] - blocks[b]["inputs"] for b in names)

        def cost(names, blocks=blocks):
            return sum(blocks[b]["ms"] for b in names)

        assert chosen == [b for b in blocks if b in chosen]  # network order
        useful = [b for b in blocks if blocks[b]["saved"] > blocks[b]["inputs"]]
        feasible = [c for r in range(len(useful) + 1) for c in itertools.combinations(useful, r) if freed(c) >= need]
        if not feasible:
            assert chosen == useful  # the budget cannot be met: every block that frees memory
            continue
        assert freed(chosen) >= need - 1e-9
        assert cost(chosen) <= 1.05 * min(cost(c) for c in feasible) + 1e-9  # the brute-force optimum, up to rounding
    # two cheap blocks that together free just enough beat one expensive block, despite the rounding
    close = {"A": {"saved": 50.1, "inputs": 0.0, "ms": 1.0}, "B": {"saved": 49.95, "inputs": 0.0, "ms": 1.0},
             "C": {"saved": 100.0, "inputs": 0.0, "ms": 100.0}}
    assert choose_blocks({"blocks": close, "total_saved": 200.05}, 100.05 / 200.05) == ["A", "B"]
    assert choose_blocks({"blocks": {"a": {"saved": 5.0, "inputs": 1.0, "ms": 1.0}}, "total_saved": 5.0}, 1.0) == []
