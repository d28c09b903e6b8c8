"""int8 quantization of the projection text models (pQRNN, PRADO): dynamic PTQ, static FX PTQ, FX QAT.

The string hashing (``model.projection``) is Python pre-processing with no weights; the flows run
on ``model.encoder``, the tensor path ``(features, mask) -> logits``, and a deployable model is the
float model with its encoder swapped for the int8 one. The masked / recurrent steps are
``torch.fx.wrap``-ped in the model code, so FX keeps them as float calls while every Linear
(bottleneck, gate or n-gram convolutions, classifier) becomes an int8 kernel.

Agreement and SQNR are measured on real WordNet glosses with models trained for a few seconds
(an untrained model predicts one or two classes, which makes top-1 agreement meaningless).
"""
from __future__ import annotations

import copy
import io

import lightning as L
import pytest
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn.functional as F
from conftest import needs_wordnet
from torch import nn

import lightning_eff.models._register_text  # noqa: F401  (registers pqrnn, prado)
from lightning_eff.compression.quantization.fx import (
    calibrate,
    convert_fx_model,
    dynamic_quantize,
    prepare_ptq_fx_model,
    prepare_qat_fx_model,
    set_fake_quant,
    set_observers,
    sqnr_db,
)
from lightning_eff.compression.quantization.preflight import check_traceable
from lightning_eff.measure import state_dict_bytes
from lightning_eff.models import create_model
from lightning_eff.models.projection import TernaryProjection

torch.set_num_threads(1)

NAMES = ["pqrnn_tiny", "prado_tiny"]
#: the float call each encoder keeps out of the int8 graph
OPAQUE = {"pqrnn_tiny": "qrnn_recurrence", "prado_tiny": "ngram_attention"}
QUANTIZED_LINEAR = (nnq.Linear, nnqd.Linear, nniq.LinearReLU)  # dynamic Linear subclasses nnq.Linear


@pytest.fixture(scope="module")
def wordnet():
    from lightning_eff.data import WordNetSupersenseDataModule

    dm = WordNetSupersenseDataModule(limit_train=2048, limit_val=256, limit_test=32, batch_size=64)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def trained(wordnet):
    """``{name: float model}`` trained 3 shuffled epochs (Adam, lr 0.01): ~37% val accuracy, 26 classes."""
    texts, labels = wordnet.texts("train"), torch.tensor(wordnet.labels("train"))
    models = {}
    for name in NAMES:
        torch.manual_seed(0)
        net = create_model(name, num_classes=wordnet.num_classes)
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        for _ in range(3):
            order = torch.randperm(len(texts)).tolist()
            for i in range(0, len(order), 64):
                rows = order[i : i + 64]
                loss = F.cross_entropy(net([texts[j] for j in rows]), labels[rows])
                opt.zero_grad()
                loss.backward()
                opt.step()
        models[name] = net.eval()
    return models


def _with_encoder(net: nn.Module, encoder: nn.Module) -> nn.Module:
    out = copy.deepcopy(net)
    out.encoder = encoder
    return out.eval()


def _calibration(net, texts, n_batches: int = 6):
    return [net.projection(texts[i : i + 64]) for i in range(0, 64 * n_batches, 64)]


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def _static_int8(net, texts, **kw):
    example = net.projection(texts[:2])
    prepared = prepare_ptq_fx_model(net.encoder, example, **kw)
    calibrate(prepared, _calibration(net, texts), input_fn=tuple)
    return convert_fx_model(prepared)


def _quantized_linears(module: nn.Module) -> list[str]:
    """Names of int8 Linear kernels (static or dynamic, with or without a fused ReLU)."""
    return [n for n, m in module.named_modules() if isinstance(m, QUANTIZED_LINEAR)]


# ------------------------------------------------------------------------------- tracing
@pytest.mark.parametrize("name", NAMES)
def test_encoder_traces_with_masked_steps_as_single_float_calls(name):
    """FX traces the tensor path; the data-dependent parts are one opaque call each; no hashing inside."""
    net = create_model(name, num_classes=5)
    graph = check_traceable(net.encoder)
    calls = [str(n.target.__name__) for n in graph.nodes if n.op == "call_function" and hasattr(n.target, "__name__")]
    assert OPAQUE[name] in calls
    assert not any(isinstance(m, TernaryProjection) for m in net.encoder.modules())


def test_qat_traced_zoneout_follows_train_and_eval():
    """QAT traces in training mode; zoneout must still switch off in eval (it is a Dropout module, not a Python branch)."""
    torch.manual_seed(0)
    net = create_model("pqrnn", num_classes=4, num_hashes=2, hash_bits=32, bottleneck=8, hidden=6, num_layers=1,
                       zoneout=0.5, dropout=0.0)
    feats, mask = net.projection(["a small rodent with a long tail", "a hand tool for driving nails"])
    prepared = prepare_qat_fx_model(net.encoder, (feats, mask))
    prepared(feats, mask)  # observers record ranges once
    # with fake quantization and observers off, the prepared graph must compute the float model
    set_fake_quant(prepared, False)
    set_observers(prepared, False)
    prepared.train()
    assert not torch.equal(prepared(feats, mask), prepared(feats, mask))  # zoneout draws in training
    prepared.eval()
    net.encoder.eval()
    torch.testing.assert_close(prepared(feats, mask), net.encoder(feats, mask), atol=1e-6, rtol=1e-5)
    set_fake_quant(prepared, True)
    int8 = convert_fx_model(prepared)
    torch.testing.assert_close(int8(feats, mask), int8(feats, mask), atol=0, rtol=0)
    assert sqnr_db(prepared(feats, mask), int8(feats, mask)) > 20


# ------------------------------------------------------------------------------- dynamic PTQ
@needs_wordnet
@pytest.mark.parametrize("name", NAMES)
def test_dynamic_int8_agrees_with_float_and_round_trips(name, trained, wordnet):
    net, texts = trained[name], wordnet.texts("val")
    int8 = dynamic_quantize(net)
    assert isinstance(int8.projection, TernaryProjection)  # hashing untouched, still Python
    assert len(_quantized_linears(int8.encoder)) == sum(isinstance(m, nn.Linear) for m in net.encoder.modules())
    with torch.no_grad():
        ref, out = net(texts), int8(texts)
    assert _agreement(ref, out) >= 0.9
    assert sqnr_db(ref, out) > 20
    assert state_dict_bytes(int8.encoder) < state_dict_bytes(net.encoder)
    # save / load: the int8 state dict loads into a freshly quantized model of the same shape
    buf = io.BytesIO()
    torch.save(int8.state_dict(), buf)
    fresh = dynamic_quantize(create_model(name, num_classes=wordnet.num_classes).eval())
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    with torch.no_grad():
        torch.testing.assert_close(fresh(texts), out, atol=0, rtol=0)


# ------------------------------------------------------------------------------- static PTQ
@needs_wordnet
@pytest.mark.parametrize("name", NAMES)
def test_static_int8_agrees_with_float_and_round_trips(name, trained, wordnet, tmp_path):
    net, texts = trained[name], wordnet.texts("val")
    int8_encoder = _static_int8(net, wordnet.texts("train"))
    # every Linear of the encoder is an int8 kernel (static: activations int8 as well)
    assert len(_quantized_linears(int8_encoder)) == sum(isinstance(m, nn.Linear) for m in net.encoder.modules())
    int8 = _with_encoder(net, int8_encoder)
    with torch.no_grad():
        ref, out = net(texts), int8(texts)
    assert _agreement(ref, out) >= 0.9
    assert sqnr_db(ref, out) > 20
    # TorchScript save / load of the int8 tensor path (what an app ships next to its hashing code)
    feats, mask = net.projection(texts)
    path = tmp_path / f"{name}_int8.pt"
    torch.jit.save(torch.jit.script(int8_encoder), str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(feats, mask), int8_encoder(feats, mask), atol=0, rtol=0)
        short = net.projection(["a tool", "x"])  # another length: the scripted recurrence is not unrolled
        torch.testing.assert_close(loaded(*short), int8_encoder(*short), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["pqrnn", "prado"])
def test_int8_state_dicts_are_smaller_at_full_size(name):
    """Full-size models (512 features): int8 state dicts are < 35% of float32 (tiny ones are
    dominated by per-tensor metadata: pqrnn_tiny static grows, 17 kB -> 19 kB)."""
    torch.manual_seed(0)
    net = create_model(name, num_classes=26).eval()
    texts = ["a hand tool for driving nails", "a small rodent with a long tail", "an act of kindness"] * 4
    static = _static_int8(net, texts, observer="minmax")
    float_bytes = state_dict_bytes(net.encoder)
    assert state_dict_bytes(static) < 0.35 * float_bytes
    assert state_dict_bytes(dynamic_quantize(net.encoder)) < 0.35 * float_bytes
    with torch.no_grad():
        assert sqnr_db(net.encoder(*net.projection(texts)), static(*net.projection(texts))) > 20


# ------------------------------------------------------------------------------- QAT
@needs_wordnet
@pytest.mark.parametrize("name", NAMES)
def test_qat_fine_tune_converts_to_matching_int8(name, trained, wordnet):
    net, texts = trained[name], wordnet.texts("train")
    labels = torch.tensor(wordnet.labels("train"))
    val = net.projection(wordnet.texts("val"))
    prepared = prepare_qat_fx_model(net.encoder, net.projection(texts[:2]))
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(texts), generator=gen)[:512].tolist()
    for i in range(0, len(order), 64):  # a short QAT fine-tune from the float weights
        rows = order[i : i + 64]
        loss = F.cross_entropy(prepared(*net.projection([texts[j] for j in rows])), labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    prepared.eval()
    int8 = convert_fx_model(prepared)
    assert prepared.training is False and len(_quantized_linears(int8)) > 0
    with torch.no_grad():
        fake, out, ref = prepared(*val), int8(*val), net.encoder(*val)
    # the int8 kernels reproduce what QAT simulated, and the fine-tune stayed close to the float model
    assert _agreement(fake, out) >= 0.9 and sqnr_db(fake, out) > 20
    assert _agreement(ref, out) >= 0.8


# ------------------------------------------------------------------------------- callback
@needs_wordnet
def test_dynamic_ptq_callback_on_a_pqrnn_fit(tmp_path):
    from lightning_eff import ClassificationTask, PostTrainingQuantization
    from lightning_eff.data import WordNetSupersenseDataModule

    dm = WordNetSupersenseDataModule(limit_train=128, limit_val=64, limit_test=32, batch_size=32)
    torch.manual_seed(0)
    task = ClassificationTask({"name": "pqrnn_tiny", "num_classes": 26}, optimizer="adamw", lr=0.01, scheduler="constant")
    ptq = PostTrainingQuantization(mode="dynamic", engines=["x86"])
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                        default_root_dir=str(tmp_path), enable_checkpointing=False, callbacks=[ptq])
    trainer.fit(task, datamodule=dm)
    models = ptq.deployable_models()
    assert list(models) == ["ptq_dynamic_int8_x86"]
    int8 = models["ptq_dynamic_int8_x86"]
    assert len(_quantized_linears(int8.encoder)) == 4  # bottleneck, 2 gate convolutions, classifier
    assert isinstance(task.model.encoder.bottleneck, nn.Linear)  # the trained model stays float
    texts = dm.texts("val")
    task.model.eval()
    with torch.no_grad():
        ref, out = task.model(texts), int8(texts)
    assert _agreement(ref, out) >= 0.9 and sqnr_db(ref, out) > 20
