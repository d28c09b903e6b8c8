"""Efficient architectures: projection, pQRNN/QRNN, PRADO, baselines, depthwise-separable cost."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_OVERRIDES, needs_wordnet

import lightning_eff.models._register_text  # noqa: F401  (registers pqrnn, prado, lstm, bert_*, plain_cnn)
from lightning_eff.errors import ConfigError
from lightning_eff.models import create_model
from lightning_eff.models.baselines import LSTMClassifier
from lightning_eff.models.conv_cost import (
    layer_ratios,
    model_ratios,
    replace_depthwise_with_standard,
)
from lightning_eff.models.pqrnn import QRNNLayer, masked_pool
from lightning_eff.models.projection import TernaryProjection, tokenize

torch.set_num_threads(1)

TEXTS = [
    "a hand tool for driving nails",
    "a small rodent with a long tail",
    "",
    "the study of living organisms, their structure and evolution; biology is a science",
]


def _features_digest(seed: int = 0, char_ngrams: int = 0) -> str:
    feats, mask = TernaryProjection(num_hashes=4, hash_bits=64, seed=seed, char_ngrams=char_ngrams)(TEXTS)
    return hashlib.sha256(feats.numpy().tobytes() + mask.numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------ projection
def test_projection_is_deterministic_across_processes():
    """Another interpreter with a different PYTHONHASHSEED (salted str hash) gives identical features."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_architectures as t; "
        "print(t._features_digest(0, 0), t._features_digest(0, 3))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].split() == [_features_digest(0, 0), _features_digest(0, 3)]
    assert _features_digest(1, 0) != _features_digest(0, 0)  # the seed selects the hash functions
    assert _features_digest(0, 3) != _features_digest(0, 0)


def test_projection_values_shape_mask_and_cache():
    proj = TernaryProjection(num_hashes=4, hash_bits=64, cache_size=3)
    feats, mask = proj(TEXTS)
    lengths = [len(tokenize(t)) for t in TEXTS]
    assert feats.shape == (4, max(lengths), 4 * 64 // 2) and proj.out_features == 128
    assert mask.sum(1).tolist() == lengths
    assert set(feats.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.all(feats[~mask] == 0)
    valid = feats[mask]
    assert 0.4 < float((valid == 0).float().mean()) < 0.6  # two bits per feature: P(0) = 1/2
    assert abs(float(valid.mean())) < 0.05  # +1 and -1 equally likely
    assert len(proj._cache) == 3  # the LRU keeps cache_size tokens
    again, _ = TernaryProjection(num_hashes=4, hash_bits=64, cache_size=0)(TEXTS)
    assert torch.equal(feats, again)  # cached and uncached paths agree
    assert sum(p.numel() for p in proj.parameters()) == 0  # no embedding table
    # Same word, same features wherever it appears (and case-insensitive).
    f2, _ = proj(["Tool", "a TOOL"])
    assert torch.equal(f2[0, 0], f2[1, 1])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_projection_preserves_similarity():
    # Sentences: near duplicates share most token features; unrelated ones are near-orthogonal.
    proj = TernaryProjection(num_hashes=8, hash_bits=128)
    texts = ["the quick brown fox jumps over the lazy dog", "the quick brown fox jumped over the lazy dog",
             "an account of money held at a bank"]
    feats, mask = proj(texts)
    pooled = masked_pool(feats, mask, "mean")
    assert _cos(pooled[0], pooled[1]) > 0.8 > 0.5 > abs(_cos(pooled[0], pooled[2]))
    # Words: with character n-grams the projection is locality sensitive (SimHash).
    proj3 = TernaryProjection(num_hashes=8, hash_bits=128, char_ngrams=3)
    words, _ = proj3(["colour", "color", "banana", "colours"])
    w = words[:, 0]
    assert _cos(w[0], w[1]) > 0.3 > abs(_cos(w[0], w[2]))
    assert _cos(w[0], w[3]) > _cos(w[0], w[2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hash_bits=3), r"model.hash_bits=3 must be even"),
        (dict(hash_bits=1024), r"model.hash_bits=1024"),
        (dict(num_hashes=0), r"model.num_hashes=0"),
        (dict(char_ngrams=1), r"model.char_ngrams=1"),
        (dict(max_tokens=0), r"model.max_tokens=0"),
    ],
)
def test_projection_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TernaryProjection(**kwargs)


def test_projection_rejects_a_bare_string():
    with pytest.raises(ConfigError, match="list of strings"):
        TernaryProjection()("one text, not a list")


# ------------------------------------------------------------------------------------ QRNN
def _reference_direction(direction, x: torch.Tensor, n: int) -> torch.Tensor:
    """Step-by-step QRNN (Bradbury et al., 2017) over the first n positions of x [L, d]."""
    w, b, k = direction.gates.weight, direction.gates.bias, direction.kernel
    h_dim = direction.hidden
    c = torch.zeros(h_dim)
    outs = []
    for t in range(n):
        window = [x[s] if s >= 0 else torch.zeros(x.shape[1]) for s in range(t - k + 1, t + 1)]
        g = w @ torch.cat(window) + b
        z, f, o = torch.tanh(g[:h_dim]), torch.sigmoid(g[h_dim:2 * h_dim]), torch.sigmoid(g[2 * h_dim:])
        c = f * c + (1 - f) * z
        outs.append(o * c)
    return torch.stack(outs)


@pytest.mark.parametrize("kernel", [1, 2, 3])
def test_qrnn_layer_matches_step_by_step_reference(kernel):
    torch.manual_seed(0)
    layer = QRNNLayer(in_features=5, hidden=4, kernel=kernel, zoneout=0.3).eval()
    lengths = [6, 3, 1]
    x = torch.randn(3, 6, 5)
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    out = layer(x, mask)
    assert out.shape == (3, 6, 8)
    for row, n in enumerate(lengths):
        seq = x[row, :n]
        fwd = _reference_direction(layer.fwd, seq, n)
        bwd = _reference_direction(layer.bwd, seq.flip(0), n).flip(0)
        torch.testing.assert_close(out[row, :n, :4], fwd, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[row, :n, 4:], bwd, atol=1e-5, rtol=1e-5)


def test_zoneout_only_in_training():
    torch.manual_seed(0)
    layer = QRNNLayer(5, 4, kernel=2, zoneout=0.5)
    x, mask = torch.randn(2, 7, 5), torch.ones(2, 7, dtype=torch.bool)
    layer.train()
    assert not torch.allclose(layer(x, mask), layer(x, mask))
    layer.eval()
    torch.testing.assert_close(layer(x, mask), layer(x, mask), atol=0, rtol=0)


# ---------------------------------------------------------------------------- whole models
def _lstm_small() -> LSTMClassifier:
    net = create_model("lstm", num_classes=5, vocab_size=50, embed_dim=8, hidden=6)
    net.fit_vocabulary(TEXTS)
    return net


def _model_and_inputs(name: str):
    if name == "lstm":
        return _lstm_small(), TEXTS
    if name == "bert_tiny":
        ids = torch.randint(5, 100, (4, 9))
        return create_model("bert_tiny", num_classes=5, vocab_size=100), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return create_model(name, num_classes=5), TEXTS


@pytest.mark.parametrize("name", ["pqrnn_tiny", "prado_tiny", "lstm", "bert_tiny"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    net, inputs = _model_and_inputs(name)
    net.train()
    logits = net(**inputs) if isinstance(inputs, dict) else net(inputs)
    assert logits.shape == (4, 5)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    for pname, p in net.named_parameters():
        if name == "bert_tiny" and "token_type" in pname:
            continue  # BERT's token_type rows other than 0 are never used by single-segment inputs
        assert p.grad is not None, pname
        assert float(p.grad.abs().sum()) > 0, pname


@pytest.mark.parametrize("name", ["pqrnn_tiny", "prado_tiny"])
def test_tiny_projection_models_learn(name):
    torch.manual_seed(0)
    net = create_model(name, num_classes=4)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    labels = torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(net(TEXTS), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


@pytest.mark.export
@pytest.mark.parametrize("name", ["pqrnn_tiny", "prado_tiny"])
def test_tensor_path_scripts_quantizes_and_verifies(name, tmp_path):
    """The exported encoder equals eager on inputs of another length; dynamic int8 stays close."""
    from lightning_eff.compression.quantization.fx import dynamic_quantize, sqnr_db
    from lightning_eff.export import export_torchscript

    torch.manual_seed(0)
    net = create_model(name, num_classes=5).eval()
    feats, mask = net.projection(TEXTS)
    path = export_torchscript(net.encoder, (feats, mask), tmp_path / f"{name}.pt", method="script")
    loaded = torch.jit.load(str(path))
    other = net.projection(["one two three four five six seven eight nine ten eleven twelve", "x"])
    for f, m in [(feats, mask), other]:
        torch.testing.assert_close(loaded(f, m), net.forward_features(f, m), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(net.forward_features(feats, mask), net(TEXTS), atol=0, rtol=0)
    int8 = dynamic_quantize(net)
    assert sqnr_db(net(TEXTS), int8(TEXTS)) > 20
    scripted_int8 = torch.jit.script(int8.encoder)
    torch.testing.assert_close(scripted_int8(*other), int8.forward_features(*other), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", ["pqrnn", "pqrnn_tiny", "prado", "prado_tiny", "lstm", "bert_tiny", "plain_cnn"])
def test_registry_creates(name):
    net = create_model(name, num_classes=7)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_projection_models_are_small():
    from lightning_eff.measure import count_parameters

    pq, lstm = create_model("pqrnn", num_classes=26), create_model("lstm", num_classes=26)
    assert count_parameters(lstm) > 10 * count_parameters(pq)
    assert sum(p.numel() for p in pq.projection.parameters()) == 0


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("pqrnn", dict(pooling="avg"), r"model.pooling='avg'.*choose one of"),
        ("pqrnn", dict(zoneout=1.0), r"model.zoneout=1.0"),
        ("pqrnn", dict(kernel=0), r"model.kernel=0"),
        ("pqrnn", dict(hash_bits=7), r"model.hash_bits=7"),
        ("pqrnn", dict(hiden=4), r"no option 'hiden'.*Did you mean 'hidden'"),
        ("prado", dict(ngrams=[]), r"model.ngrams=\[\]"),
        ("prado", dict(ngrams=[1, 0]), r"model.ngrams\[\]=0"),
        ("lstm", dict(pooling="mean_mx"), r"Did you mean 'mean_max'"),
        ("bert_teacher", dict(size="huge"), r"model.size='huge'.*'base'"),
        ("plain_cnn", dict(standard_convs="yes"), r"model.standard_convs='yes'"),
    ],
)
def test_bad_options_raise_config_error(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_model(name, num_classes=5, **kwargs)


# --------------------------------------------------------------------------------- LSTM
def test_lstm_vocabulary_is_deterministic_and_saved(tmp_path):
    net = _lstm_small()
    words = list(net.words)
    assert words[:1] == ["a"]  # the most frequent word first
    net2 = _lstm_small()
    assert list(net2.words) == words
    torch.save(net.state_dict(), tmp_path / "lstm.pt")
    fresh = create_model("lstm", num_classes=5, vocab_size=50, embed_dim=8, hidden=6)
    fresh.load_state_dict(torch.load(tmp_path / "lstm.pt", weights_only=True))
    assert fresh.words == net.words and fresh.frozen
    net.eval(), fresh.eval()
    torch.testing.assert_close(fresh(TEXTS), net(TEXTS))


def test_lstm_online_vocabulary_grows_only_in_training():
    net = create_model("lstm", num_classes=5, vocab_size=4, embed_dim=8, hidden=6)
    net.eval()
    ids, _ = net.encode(["hello world"])
    assert ids.tolist() == [[1, 1]] and not net.words  # eval: unknown words are [UNK], nothing learned
    net.train()
    net.encode(["hello world", "a b c d e"])
    assert list(net.words) == ["hello", "world", "a", "b"]  # capped at vocab_size
    with pytest.raises(ConfigError, match="exceeds model.vocab_size=4"):
        net.set_vocabulary(["a", "b", "c", "d", "e"])


# ------------------------------------------------------------------- depthwise-separable
@pytest.mark.parametrize("c_in, c_out, kernel, size, stride", [(32, 64, 3, 16, 1), (16, 16, 5, 9, 2), (8, 128, 3, 7, 1)])
def test_dwsep_layer_ratio_hand_formula(c_in, c_out, kernel, size, stride):
    r = layer_ratios(c_in, c_out, kernel, size, stride)
    # Howard et al. (2017), eq. 5: (k² C_in + C_in C_out) / (k² C_in C_out) = 1/C_out + 1/k².
    assert r["formula_param_ratio"] == pytest.approx(1 / c_out + 1 / kernel**2)
    assert r["formula_mac_ratio"] == pytest.approx(1 / c_out + 1 / kernel**2)
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    assert r["formula"]["standard"]["macs"] == kernel * kernel * c_in * c_out * out * out
    assert r["measured"] == r["formula"]  # count_parameters / count_macs on real convs agree exactly


def test_plain_cnn_mirrors_mobilenet_and_costs_more():
    mnv2 = create_model("mobilenetv2_tiny", num_classes=10)
    plain = replace_depthwise_with_standard(mnv2)
    convs = lambda m: [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    assert convs(plain) == convs(mnv2)  # same depth, shapes and strides
    assert all(c.groups == 1 for c in plain.modules() if isinstance(c, torch.nn.Conv2d))
    x = torch.randn(2, 1, 32, 32)
    assert plain.eval()(x).shape == (2, 10)
    ratios = model_ratios(width=0.35, input_size=32)
    assert 0.0 < ratios["param_ratio"] < 0.3 and 0.0 < ratios["mac_ratio"] < 0.3


# --------------------------------------------------------------------------------- recipes
@needs_wordnet
@pytest.mark.slow
def test_pqrnn_recipe_runs(tmp_path):
    from lightning_eff.cli import compose, run

    result = run(compose("pqrnn", [f"run_dir={tmp_path}", "model=pqrnn", "++model.hidden=16", "++model.bottleneck=16",
                                   *TINY_OVERRIDES]))
    assert 0.0 <= result["metrics"]["test/acc"] <= 1.0
    rows = result["report"]
    assert rows["fp32"]["params"] > 0
    # int8 encoders (static PTQ through the whole network, and dynamic): measured like the float row, smaller
    for variant in ("ptq_int8_x86", "ptq_dynamic_int8_x86"):
        assert 0.0 <= rows[variant]["test_acc"] <= 1.0, variant
        assert rows[variant]["fp32_bytes"] < rows["fp32"]["fp32_bytes"], variant  # serialized state dict
    # every variant's encoder exported (scripted), reloaded and verified
    artifacts = {f"{a['variant']}.{a['format']}": a for a in result["artifacts"]}
    assert set(artifacts) == {f"{v}.{f}" for v in ("fp32", "ptq_int8_x86", "ptq_dynamic_int8_x86") for f in ("pt", "ptl")}
    assert all(a.get("top1_agreement") == 1.0 for a in artifacts.values()), artifacts


@needs_wordnet
@pytest.mark.slow
def test_pqrnn_lstm_kd_recipe_trains_the_teacher_then_distils(tmp_path):
    """One command: the LSTM teacher stage, its logit cache over the raw-text split, then pQRNN distilled from it."""
    from lightning_eff.cli import compose, run

    overrides = [f"run_dir={tmp_path}", "++model.hidden=16", "++model.bottleneck=16", "++stages.teacher.model.vocab_size=500",
                 "++stages.teacher.model.embed_dim=16", "++stages.teacher.model.hidden=16", "callbacks.ptq=null", "callbacks.ptq_dynamic=null",
                 *TINY_OVERRIDES]
    result = run(compose("pqrnn_lstm_kd", overrides))
    assert (tmp_path / "teacher" / "teacher.ckpt").exists() and (tmp_path / "teacher" / "train_logits.pt").exists()
    assert 0.0 <= result["metrics"]["teacher/test_acc"] <= 1.0 and 0.0 <= result["metrics"]["test/acc"] <= 1.0
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "distill/kd_loss_epoch" in header, header
    assert {"fp32", "teacher"} <= set(result["report"])
    # the teacher (an LSTM, no `encoder`) is a report row, not an export: only the student's encoder is exported
    assert {a["variant"] for a in result["artifacts"] if "error" not in a} == {"fp32"}


@needs_wordnet
def test_tfidf_svm_baseline_beats_majority():
    from lightning_eff.data import WordNetSupersenseDataModule
    from lightning_eff.learning.baselines import tfidf_svm_baseline

    dm = WordNetSupersenseDataModule(limit_train=3000, limit_val=200, limit_test=500)
    result = tfidf_svm_baseline(dm, char_ngrams=False)
    assert result["test_acc"] > result["majority_acc"] + 0.2
    assert np.isfinite(result["seconds"])
