"""QuantizationAwareTraining / PostTrainingQuantization on a real (tiny) Lightning fit."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from user_module import quiet_trainer, same_as_train

from lightning_eff import (
    ClassificationTask,
    ConfigError,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_eff.measure import count_parameters

#: Fixed tensors, no shuffling: two fits see identical batches (for resume equivalence); val/test = train.
TinyData = same_as_train


def _task(depth: float = 0.3) -> ClassificationTask:
    """A shallow MobileNetV2 (8 of 17 blocks: every block kind, half the graph; ExecuTorch lowering scales with it)."""
    torch.manual_seed(0)
    return ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1, "depth": depth}, optimizer="sgd", lr=0.05,
                              scheduler="constant")


def _trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    return quiet_trainer(tmp_path, callbacks, **{**dict(max_epochs=1, limit_train_batches=3, limit_val_batches=1, limit_test_batches=2,
                                                        num_sanity_val_steps=0), **kw})


def test_qat_prepares_in_setup_converts_a_copy_and_stays_trainable(tmp_path):
    task, dm = _task(), TinyData()
    qat = QuantizationAwareTraining(engines=["x86", "qnnpack"], start_step=1)
    trainer = _trainer(tmp_path, [qat])
    trainer.fit(task, datamodule=dm)
    assert isinstance(task.model, torch.fx.GraphModule) and task.model is qat.prepared_model
    models = qat.deployable_models()
    assert sorted(models) == ["qat_int8_qnnpack", "qat_int8_x86"]
    x = dm.sample_inputs(4)
    for name, int8 in models.items():
        engine = name.rsplit("_", 1)[1]
        with torch.backends.quantized.engine_context(engine) if hasattr(torch.backends.quantized, "engine_context") else _engine(engine):
            out = int8(x)
        assert out.shape == (4, 10)
        assert any(p.is_quantized for p in int8.state_dict().values() if isinstance(p, torch.Tensor)) or count_parameters(int8) > 0
    # The trained module is still the fake-quant model: test and a second fit work (Lightning #7427, #12896).
    trainer.test(task, datamodule=dm, verbose=False)
    trainer2 = _trainer(tmp_path, [qat], max_epochs=2)
    trainer2.fit(task, datamodule=dm)
    assert task.model is qat.prepared_model


class _engine:
    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        self.old = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.engine

    def __exit__(self, *exc):
        torch.backends.quantized.engine = self.old


def test_schedule_flags_are_a_pure_function_of_the_step():
    qat = QuantizationAwareTraining(start_step=2, freeze_bn_fraction=0.5, freeze_observer_step=8)
    assert qat.flags_at(0, 10) == (False, True, False)
    assert qat.flags_at(2, 10) == (True, True, False)
    assert qat.flags_at(5, 10) == (True, True, True)
    assert qat.flags_at(8, 10) == (True, False, True)


def _fake_quant_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fold_bn", [False, True])
def test_qat_resume_equals_uninterrupted(tmp_path, fold_bn):
    """Crash after epoch 1 (3 steps), resume, and end bit-identical to one uninterrupted run:
    weights, observer min/max, scales and zero points, fake-quant flags (BN folded or not)."""
    kw = dict(start_step=2, freeze_observer_step=5, **({"fold_bn": True} if fold_bn else {"freeze_bn_step": 4}))
    task_a = _task()
    _trainer(tmp_path / "a", [QuantizationAwareTraining(**kw)], max_epochs=2).fit(task_a, datamodule=TinyData())

    task_b = _task()
    first = _trainer(tmp_path / "b", [QuantizationAwareTraining(**kw)], max_epochs=1)
    first.fit(task_b, datamodule=TinyData())
    ckpt = tmp_path / "b" / "mid.ckpt"
    first.save_checkpoint(ckpt)
    # weights_only loading (no pickled objects in callback state or hyper-parameters)
    torch.load(ckpt, weights_only=True)

    task_c = _task()  # a fresh float model: the callback re-prepares it before the checkpoint is restored
    _trainer(tmp_path / "c", [QuantizationAwareTraining(**kw)], max_epochs=2).fit(task_c, datamodule=TinyData(), ckpt_path=ckpt)

    sa, sc = _fake_quant_state(task_a.model), _fake_quant_state(task_c.model)
    assert sa.keys() == sc.keys()
    assert any("activation_post_process" in k and k.endswith("scale") for k in sa)
    for k in sa:
        torch.testing.assert_close(sc[k], sa[k], rtol=0, atol=0, msg=k)


def test_qat_refuses_a_checkpoint_with_the_other_fold_bn():
    state = QuantizationAwareTraining().state_dict()
    assert state["fold_bn"] is False
    with pytest.raises(ConfigError, match=r"checkpoint was trained with fold_bn=False, this callback has fold_bn=True"):
        QuantizationAwareTraining(fold_bn=True).load_state_dict(state)
    QuantizationAwareTraining(fold_bn=True).load_state_dict(QuantizationAwareTraining(fold_bn=True).state_dict())


def test_qat_refuses_non_fp32_precision(tmp_path):
    trainer = _trainer(tmp_path, [QuantizationAwareTraining()], precision="bf16-mixed")
    with pytest.raises(ConfigError, match=r"trainer.precision='bf16-mixed'.*32-true"):
        trainer.fit(_task(), datamodule=TinyData())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"engines": ["qnnpak"]}, r"qnnpak.*Did you mean 'qnnpack'"),
        ({"flow": "onnx"}, r"flow='onnx'"),
        ({"start_fraction": 1.5}, r"start_fraction=1.5"),
        ({"start_step": 3, "start_fraction": 0.5}, r"either start_step"),
        ({"observer": "minmaxx"}, r"Did you mean 'minmax'"),
        ({"flow": "pt2e", "freeze_bn_step": 3}, r"flow='fx' only"),
        ({"per_channel": "dw"}, r"per_channel='dw' is not valid; choose one of \[True, False, 'depthwise'\]"),
        ({"flow": "pt2e", "per_channel": "depthwise"}, r"per_channel='depthwise' needs flow='fx'"),
        ({"fold_bn": True, "freeze_bn_fraction": 0.6}, r"fold_bn=True folds BatchNorm.*freeze_bn_fraction=0.6.*null"),
        ({"flow": "pt2e", "fold_bn": True}, r"fold_bn=True applies to flow='fx' only"),
        ({"fold_bn": "yes"}, r"fold_bn"),
    ],
)
def test_qat_bad_inputs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantizationAwareTraining(**kwargs)


def test_qat_module_attr_must_exist(tmp_path):
    trainer = _trainer(tmp_path, [QuantizationAwareTraining(module_attr="backbone")])
    with pytest.raises(ConfigError, match=r"module_attr='backbone'.*attributes holding modules"):
        trainer.fit(_task(), datamodule=TinyData())


def test_ptq_static_and_dynamic_make_int8_copies(tmp_path):
    task, dm = _task(), TinyData()
    static = PostTrainingQuantization(engines=["x86"], calibration_batches=2)
    dynamic = PostTrainingQuantization(mode="dynamic", engines=["x86"])
    _trainer(tmp_path, [static, dynamic]).fit(task, datamodule=dm)
    assert not isinstance(task.model, torch.fx.GraphModule)  # the trained float model is untouched
    int8 = static.deployable_models()["ptq_int8_x86"]
    with _engine("x86"):
        q, f = int8(dm.x[:8]), task.model.eval()(dm.x[:8])
    assert q.shape == f.shape
    assert "ptq_dynamic_int8_x86" in dynamic.deployable_models()


def test_ptq_bad_inputs():
    with pytest.raises(ConfigError, match="mode='dynamic' is available with flow='fx' only"):
        PostTrainingQuantization(mode="dynamic", flow="pt2e")
    with pytest.raises(ConfigError, match="calibration_batches"):
        PostTrainingQuantization(calibration_batches=0)


def test_int8_models_run_under_deterministic_mode(tmp_path):
    """Trainer(deterministic=True) turns on torch's global determinism; int8 inference inside
    quantized_engine still runs (and the user's setting is restored afterwards)."""
    from lightning_eff.compression.quantization.engines import (
        model_engine,
        quantized_engine,
    )

    task, dm = _task(), TinyData()
    ptq = PostTrainingQuantization(engines=["x86"], calibration_batches=2)
    _trainer(tmp_path, [ptq], deterministic=True).fit(task, datamodule=dm)
    assert torch.are_deterministic_algorithms_enabled()
    int8 = ptq.deployable_models()["ptq_int8_x86"]
    with quantized_engine(model_engine(int8)):
        assert int8(dm.x[:4]).shape == (4, 10)
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
