"""Runs as stage pipelines (``stages:``), ``optimized_metric``, ``extra_callbacks`` and ``_target_``
strategy / plugin nodes."""
from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from conftest import TINY_OVERRIDES, needs_fmnist

from lightning_eff.cli import _trainer, compose, list_recipes, run, validate_config
from lightning_eff.errors import ConfigError
from lightning_eff.models import create_model
from lightning_eff.stages import copy_backbone, legacy_stages, plan_stages


def test_legacy_teacher_and_finetune_keys_are_the_same_stages():
    legacy = {"teacher": {"model": {"name": "mobilenetv2"}, "max_epochs": 2, "lr": 0.1},
              "finetune": {"max_epochs": 1, "lr": 0.01, "callbacks": {"qat": {"_target_": "x.Y"}}}}
    explicit = {"stages": legacy_stages(legacy)}
    assert [dataclasses.asdict(s) for s in plan_stages(legacy)] == [dataclasses.asdict(s) for s in plan_stages(explicit)]
    teacher, fit, finetune = plan_stages(legacy)
    assert (teacher.hands_over, teacher.test, teacher.trainer, teacher.task) == (["teacher"], True, {"max_epochs": 2}, {"lr": 0.1})
    assert fit.main and fit.root_callbacks and not teacher.root_callbacks and not finetune.root_callbacks
    assert finetune.continues and finetune.callbacks == {"qat": {"_target_": "x.Y"}}


def test_order_and_removed_stages():
    plan = plan_stages({"stages": {"finetune": {"order": 1, "model": "previous"}, "fit": {"order": 0}, "teacher": None}})
    assert [s.name for s in plan] == ["fit", "finetune"]


@pytest.mark.parametrize("stages, match", [
    ({"fit": {"epochs": 2}}, r"unknown key stages.fit.epochs"),
    ({"fit": {"model": "prev"}}, r"stages.fit.model='prev' must be null"),
    ({"ft": {"model": "previous"}}, r"first stage has no previous stage"),
    ({"t": {"hands_over": "techer"}, "fit": {}}, r"hands_over='techer'.*Did you mean 'teacher'"),
    ({"t": {"hands_over": "teacher"}, "fit": {}}, r"hands over a teacher: give it a model spec"),
    ({"fit": {"task": {"learning_rate": 1}}}, r"unknown key stages.fit.task.learning_rate"),
    ({}, r"non-empty mapping"),
])
def test_bad_stages_are_refused_by_name(stages, match):
    with pytest.raises(ConfigError, match=match):
        plan_stages({"stages": stages})


def test_stages_and_legacy_keys_together_are_refused():
    with pytest.raises(ConfigError, match="either stages: or the older teacher"):
        plan_stages({"stages": {"fit": {}}, "teacher": {"model": {"name": "mobilenetv2"}}})


@pytest.mark.parametrize("recipe", list_recipes())
def test_recipes_use_stages_and_composed_callback_blocks(recipe):
    cfg = compose(recipe, ["++trainer.fast_dev_run=true", "++callbacks.distill.cache=given"] if "kd" in recipe else
                  ["++trainer.fast_dev_run=true"])
    assert cfg.get("teacher") is None and cfg.get("finetune") is None  # every recipe is expressed as stages
    plan = plan_stages(dict(cfg))
    assert sum(s.main for s in plan) == 1


def test_optimized_metric_is_checked_before_training(tmp_path):
    cfg = compose("mobilenet_baseline", ["++optimized_metric=val/accuracy", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"optimized_metric='val/accuracy' is not logged.*valid names: \[.*'val/acc'"):
        validate_config(cfg)
    cfg = compose("mobilenet_baseline", ["++optimized_metric=test/acc", "test_after_fit=false"])
    with pytest.raises(ConfigError, match=r"test metrics need test_after_fit=true"):
        validate_config(cfg)
    validate_config(compose("mobilenet_kd", ["++optimized_metric=teacher/test_acc"]))  # a stage's metric is valid too


def test_strategy_and_plugins_as_target_nodes(tmp_path):
    trainer = _trainer({"strategy": {"_target_": "lightning.pytorch.strategies.SingleDeviceStrategy", "device": "cpu"},
                        "plugins": [{"_target_": "lightning.pytorch.plugins.environments.LightningEnvironment"}],
                        "fast_dev_run": True, "accelerator": "cpu"}, [], tmp_path, multirun=False)
    assert type(trainer.strategy).__name__ == "SingleDeviceStrategy"
    assert type(trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"  # ours is still added
    cfg = compose("mobilenet_baseline", ["++trainer.strategy._target_=lightning.pytorch.strategies.Nope"])
    with pytest.raises(ConfigError, match=r"trainer.strategy._target_=.*cannot be imported"):
        validate_config(cfg)


def test_copy_backbone_copies_matching_tensors_only():
    src = create_model("plain_cnn", width=0.25, num_classes=3)
    dst = create_model("plain_cnn", width=0.25, num_classes=5)  # another head
    copied = copy_backbone(src, dst)
    head = [k for k, v in dst.state_dict().items() if v.shape != src.state_dict().get(k, v).shape]
    assert head and not set(head) & set(copied) and len(copied) > 10
    assert all(torch.equal(dst.state_dict()[k], src.state_dict()[k]) for k in copied)
    with pytest.raises(ConfigError, match=r"does not fit the model's backbone.*of another shape \[\('bias'"):
        copy_backbone(torch.nn.Linear(2, 2), torch.nn.Conv2d(1, 1, 1))


class _Seen(L.Callback):
    def __init__(self):
        self.started = 0
        self.weights = None

    def on_fit_start(self, trainer, pl_module):
        self.started += 1
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


@needs_fmnist
def test_pipeline_hands_a_backbone_over_and_extra_callbacks_join_the_last_stage(tmp_path):
    """pre (its own model, hands over its backbone) -> fit (another head): the fit stage starts from the
    pre stage's trained weights; an extra callback runs in the last stage only; the metric is returned."""
    spec = "{name: plain_cnn, width: 0.25, small_input_stages: 1}"
    cfg = compose("mobilenet_baseline", [
        f"run_dir={tmp_path}", *TINY_OVERRIDES, "callbacks.footprint=null", "++report.latency=false", "++report.memory=false",
        f"++stages={{pre: {{model: {spec}, hands_over: backbone}}, fit: {{model: {spec}}}}}", "++optimized_metric=val/acc",
    ])
    seen = _Seen()
    result = run(cfg, extra_callbacks=[seen])
    assert result["stages"] == ["pre", "fit"] and seen.started == 1
    assert result["optimized_metric"] == "val/acc" and result["objective"] == result["metrics"]["val/acc"]
    pre = torch.load(tmp_path / "pre" / "pre.ckpt", weights_only=True)["state_dict"]
    pre = {k[len("model."):]: v for k, v in pre.items() if k.startswith("model.")}
    assert all(torch.equal(seen.weights[k], v) for k, v in pre.items())


@needs_fmnist
def test_init_hand_over_that_does_not_fit_is_refused_by_stage(tmp_path):
    cfg = compose("mobilenet_baseline", [
        f"run_dir={tmp_path}", *TINY_OVERRIDES, "callbacks.footprint=null", "++trainer.max_steps=1",
        "++stages={pre: {model: {name: plain_cnn, width: 0.25}, hands_over: init}, fit: {model: {name: plain_cnn, width: 0.5}}}",
    ])
    with pytest.raises(ConfigError, match=r"stages.fit: the previous stage hands over 'init'.*hand over 'backbone'"):
        run(cfg)
    assert (tmp_path / "pre" / "pre.ckpt").is_file()  # the trained stage is kept



class _Tested(L.Callback):
    def on_test_end(self, trainer, pl_module):
        self.module, self.datamodule = pl_module, trainer.datamodule


@needs_fmnist
@pytest.mark.parametrize("stages", [False, True])
def test_report_takes_the_tested_accuracy_of_the_trained_row_and_it_agrees(tmp_path, stages):
    """trainer.test already measured the trained model on every test image: the report's row takes that figure
    (no second pass) and it equals evaluate_accuracy on the same model and loader; the other rows are evaluated."""
    from lightning_eff.report import evaluate_accuracy

    spec = "{name: plain_cnn, width: 0.25, small_input_stages: 1}"
    extra = [f"++stages={{pre: {{model: {spec}}}, fit: {{model: previous}}}}"] if stages else [f"++stages={{fit: {{model: {spec}}}}}"]
    common = [*TINY_OVERRIDES, "callbacks.footprint=null", "++report.latency=false", *extra]
    tested = _Tested()
    result = run(compose("mobilenet_baseline", [f"run_dir={tmp_path}", *common, "++trainer.limit_test_batches=1.0"]),
                 extra_callbacks=[tested])
    row = result["report"]["trained" if stages else "fp32"]
    assert row["test_acc_from"] == "trainer.test" and row["test_acc"] == pytest.approx(result["metrics"]["test/acc"])
    tested.datamodule.setup("test")
    direct = evaluate_accuracy(tested.module.model.cpu(), tested.datamodule.test_dataloader())
    assert direct == pytest.approx(row["test_acc"], abs=1e-6)
    if stages:
        assert "test_acc_from" not in result["report"]["fp32"] and result["report"]["fp32"]["test_acc"] is not None
    sliced = run(compose("mobilenet_baseline", [f"run_dir={tmp_path / 'sliced'}", *common]))
    assert all("test_acc_from" not in r for r in sliced["report"].values())  # limit_test_batches=2: evaluated again
