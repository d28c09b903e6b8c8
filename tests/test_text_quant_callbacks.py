"""The quantization callbacks on the projection text models through ``submodule="encoder"``.

pQRNN / PRADO hash raw strings in Python (``model.projection``), so the whole network cannot be
traced; the callbacks quantize the tensor-only ``encoder``, whose inputs they capture by running
the network on real examples. The deployable model is the whole network (it still takes strings)
with the int8 encoder in place.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.ao.nn.quantized as nnq
from torch import nn
from torch.utils.data import DataLoader
from user_module import quiet_trainer

import lightning_eff.models._register_text  # noqa: F401  (registers pqrnn, prado)
from lightning_eff import (
    ClassificationTask,
    ConfigError,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_eff.compression.quantization.engines import (
    model_engine,
    quantized_engine,
)
from lightning_eff.compression.quantization.fx import (
    default_reduce_range,
    set_observers,
    sqnr_db,
)
from lightning_eff.models import create_model
from lightning_eff.surgery import submodule_inputs

ADJ = ["small", "large", "red", "wooden", "ancient", "quick", "heavy", "soft"]
NOUN = {0: ["tool for cutting", "hammer", "knife blade"], 1: ["small rodent", "wild bird", "large cat"],
        2: ["city in france", "mountain range", "river valley"], 3: ["feeling of joy", "state of fear", "sudden anger"]}


class TinyText(L.LightningDataModule):
    """Fixed glosses, no shuffling: two fits see the same batches (for resume equivalence)."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.rows = [(f"{a} {n}", c) for c, nouns in NOUN.items() for n in nouns for a in ADJ][:64]
        self.batch_size = batch_size
        self.num_classes = len(NOUN)

    def sample_inputs(self, n: int = 1) -> list[str]:
        return [t for t, _ in self.rows[:n]]

    def train_dataloader(self):
        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=False)

    val_dataloader = test_dataloader = train_dataloader


def _task(name: str = "pqrnn_tiny", **spec) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask(create_model(name, num_classes=4, **spec), num_classes=4, optimizer="adamw", lr=0.01, scheduler="constant")


def _trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    return quiet_trainer(tmp_path, callbacks, **{**dict(max_epochs=2, limit_train_batches=4, limit_val_batches=1, num_sanity_val_steps=0), **kw})


def _int8_linears(net: nn.Module) -> int:
    return sum(isinstance(m, nnq.Linear) for m in net.modules())


def test_submodule_inputs_captures_the_encoder_call_and_restores_modes():
    net = create_model("pqrnn_tiny", num_classes=4).train()
    texts = ["a small hammer", "the wild bird of the valley"]
    features, mask = submodule_inputs(net, "encoder", texts)
    ref_features, ref_mask = net.projection(texts)
    torch.testing.assert_close(features, ref_features)
    torch.testing.assert_close(mask, ref_mask)
    assert all(m.training for m in net.modules())  # modes restored
    with pytest.raises(ConfigError, match=r"submodule='encoderr'.*has no submodule.*'encoder'"):
        submodule_inputs(net, "encoderr", texts)


@pytest.mark.parametrize("name", ["pqrnn_tiny", "prado_tiny"])
def test_qat_on_the_encoder_trains_the_network_and_deploys_it_on_strings(tmp_path, name):
    task, dm = _task(name), TinyText()
    # min/max observers: the ranges cover every value seen, so the int8 model (whose kernels do not clip at
    # the 7-bit fake-quant bound) and the fake-quant model compute the same function up to rounding
    qat = QuantizationAwareTraining(engines=["x86", "qnnpack"], submodule="encoder", start_step=2, observer="minmax")
    _trainer(tmp_path, [qat]).fit(task, datamodule=dm)
    # during training: only the encoder is a fake-quant graph; the projection is untouched
    assert isinstance(task.model.encoder, torch.fx.GraphModule) and task.model.encoder is qat.prepared_model
    assert any("FakeQuantize" in type(m).__name__ for m in task.model.encoder.modules())
    texts = dm.sample_inputs(32)
    # Observers are frozen outside training steps; the last steps moved the weights after the ranges were
    # observed, so values past the 7-bit x86 fake-quant bound would be compared. One explicit observing pass
    # over the comparison texts, then a fresh conversion: both models then use the same ranges.
    set_observers(qat.prepared_model, True)
    with torch.no_grad():
        task.model.eval()(texts)
    set_observers(qat.prepared_model, False)
    models = qat.convert()
    assert sorted(models) == ["qat_int8_qnnpack", "qat_int8_x86"]
    with torch.no_grad():
        reference = task.model.eval()(texts)
    n_linear = sum(isinstance(m, nn.Linear) for m in create_model(name, num_classes=4).encoder.modules())
    for variant, int8 in models.items():
        assert type(int8) is type(task.model) and int8 is not task.model
        assert model_engine(int8) == variant.rsplit("_", 1)[1]
        assert _int8_linears(int8.encoder) + sum(type(m).__name__ == "LinearReLU" for m in int8.encoder.modules()) == n_linear
        with quantized_engine(model_engine(int8)), torch.no_grad():
            out = int8(texts)  # raw strings in, int8 encoder inside
        assert out.shape == (32, 4)
        assert sqnr_db(reference, out) > 20.0, variant
    # the trained network stays trainable: a second fit continues on the same prepared encoder
    _trainer(tmp_path / "again", [qat], max_epochs=3).fit(task, datamodule=dm)
    assert task.model.encoder is qat.prepared_model


#: pqrnn_tiny without zoneout or dropout: Lightning does not restore the global RNG on resume, so a random mask
#: would differ between the two runs for reasons that have nothing to do with the callback
DETERMINISTIC = dict(num_hashes=2, hash_bits=64, bottleneck=16, hidden=8, num_layers=1, zoneout=0.0, dropout=0.0)


def test_qat_on_the_encoder_resume_equals_uninterrupted(tmp_path):
    kw = dict(submodule="encoder", start_step=2, freeze_observer_step=6)
    task_a = _task("pqrnn", **DETERMINISTIC)
    _trainer(tmp_path / "a", [QuantizationAwareTraining(**kw)], max_epochs=3).fit(task_a, datamodule=TinyText())
    task_b = _task("pqrnn", **DETERMINISTIC)
    first = _trainer(tmp_path / "b", [QuantizationAwareTraining(**kw)], max_epochs=1)
    first.fit(task_b, datamodule=TinyText())
    ckpt = tmp_path / "b" / "mid.ckpt"
    first.save_checkpoint(ckpt)
    torch.load(ckpt, weights_only=True)
    task_c = _task("pqrnn", **DETERMINISTIC)
    _trainer(tmp_path / "c", [QuantizationAwareTraining(**kw)], max_epochs=3).fit(task_c, datamodule=TinyText(), ckpt_path=ckpt)
    sa, sc = task_a.model.state_dict(), task_c.model.state_dict()
    assert sa.keys() == sc.keys() and any(k.startswith("encoder.") and k.endswith("scale") for k in sa)
    for k in sa:
        torch.testing.assert_close(sc[k], sa[k], rtol=0, atol=0, msg=k)


def test_ptq_static_on_the_encoder_calibrates_through_the_network(tmp_path):
    task, dm = _task(), TinyText()
    _trainer(tmp_path / "fit", []).fit(task, datamodule=dm)
    float_net = task.model.eval()
    ptq = PostTrainingQuantization(mode="static", engines=["x86"], submodule="encoder", calibration_batches=4)
    dynamic = PostTrainingQuantization(mode="dynamic", engines=["x86"], submodule="encoder")
    trainer = _trainer(tmp_path, [ptq, dynamic], max_epochs=1, limit_train_batches=0)
    trainer.fit(task, datamodule=dm)
    assert task.model is float_net and not isinstance(task.model.encoder, torch.fx.GraphModule)  # untouched
    texts = dm.sample_inputs(32)
    with torch.no_grad():
        reference = float_net(texts)
    for variant, int8 in {**ptq.deployable_models(), **dynamic.deployable_models()}.items():
        assert _int8_linears(int8.encoder) > 0, variant
        with quantized_engine("x86"), torch.no_grad():
            out = int8(texts)
        assert sqnr_db(reference, out) > 20.0, variant
    static = ptq.deployable_models()["ptq_int8_x86"]
    # the input quantizer was calibrated on the projection's ternary features, range [-1, 1] (histogram observer: ~)
    levels = 127 if default_reduce_range("x86") else 255
    scales = [float(v) for k, v in static.encoder.state_dict().items() if k.endswith("input_scale_0")]
    assert scales and scales[0] == pytest.approx(2 / levels, rel=2e-3), scales


@pytest.mark.parametrize("cls", [QuantizationAwareTraining, PostTrainingQuantization])
def test_submodule_bad_inputs(tmp_path, cls):
    with pytest.raises(ConfigError, match=r"submodule='encoder' needs flow='fx'"):
        cls(flow="pt2e", submodule="encoder")
    with pytest.raises(ConfigError, match=r"submodule=''"):
        cls(submodule="")
    task = _task()
    with pytest.raises(ConfigError, match=r"submodule='decoder'.*has no submodule.*encoder"):
        cb = cls(submodule="decoder")
        trainer = _trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1)
        trainer.fit(task, datamodule=TinyText())
        cb.deployable_models()


@pytest.mark.export
def test_export_the_encoder_of_every_variant(tmp_path):
    """Export(submodule='encoder'): fp32 and int8 encoders scripted, reloaded, verified on other glosses."""
    from lightning_eff import Export
    from lightning_eff.export import load_artifact

    task, dm = _task(), TinyText()
    _trainer(tmp_path / "fit", []).fit(task, datamodule=dm)
    ptq = PostTrainingQuantization(mode="static", engines=["x86"], submodule="encoder", calibration_batches=4)
    dynamic = PostTrainingQuantization(mode="dynamic", engines=["x86"], submodule="encoder")
    export = Export(formats=["pt", "ptl"], submodule="encoder", output_dir=str(tmp_path / "art"), verify_examples=8,
                    latency=False, strict=True)
    _trainer(tmp_path, [ptq, dynamic, export], max_epochs=1, limit_train_batches=0).fit(task, datamodule=dm)
    artifacts = {f"{a['variant']}.{a['format']}": a for a in export.artifacts()}
    assert set(artifacts) == {f"{v}.{f}" for v in ("fp32", "ptq_int8_x86", "ptq_dynamic_int8_x86") for f in ("pt", "ptl")}
    for name, a in artifacts.items():
        assert a["top1_agreement"] == 1.0 and a["max_abs_err"] < 1e-4, (name, a)
    # the scripted encoder takes any sequence length (the recurrence is a loop, not unrolled)
    encoder = load_artifact(artifacts["fp32.pt"]["path"])
    for texts in (["a"], ["a much longer gloss with many more words than the tracing example had"]):
        features, mask = task.model.projection(texts)
        with torch.no_grad():
            torch.testing.assert_close(encoder(features, mask), task.model.eval().encoder(features, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.export
def test_export_submodule_skips_the_teacher_and_records_variants_without_it(tmp_path):
    """A Distillation teacher (an LSTM: no ``encoder``) is a report row, not an artifact; a variant
    lacking the submodule is recorded as an error entry, not a crash after training."""
    from lightning_eff import Distillation, Export
    from lightning_eff.callbacks.export import Export as ExportCls

    task, dm = _task(), TinyText()
    teacher = create_model("lstm", num_classes=4)
    export = Export(formats=["pt"], submodule="encoder", output_dir=str(tmp_path / "art"), verify_examples=4, latency=False)
    _trainer(tmp_path, [Distillation(teacher=teacher), export], max_epochs=1, limit_train_batches=2).fit(task, datamodule=dm)
    assert [a["variant"] for a in export.artifacts()] == ["fp32"] and "error" not in export.artifacts()[0]

    class Offers(L.Callback):
        def deployable_models(self):
            return {"no_encoder": nn.Linear(3, 2)}

    odd = ExportCls(formats=["pt"], submodule="encoder", output_dir=str(tmp_path / "art2"), verify_examples=4, latency=False)
    _trainer(tmp_path / "b", [Offers(), odd], max_epochs=1, limit_train_batches=1).fit(_task(), datamodule=dm)
    by_variant = {a["variant"]: a for a in odd.artifacts()}
    assert "error" not in by_variant["fp32"] and "no submodule" in by_variant["no_encoder"]["error"]
