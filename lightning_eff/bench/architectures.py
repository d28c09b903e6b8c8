"""Efficient architectures side by side: ``python -m lightning_eff.bench architectures [--quick] [--accuracy]``.

Footprint (same 32 WordNet test glosses for every model; token models read them as WordPiece
ids): serialized ``state_dict`` bytes, parameters, MACs per example (``macs``) and median CPU latency at
batch 1 and 32 of pQRNN and PRADO (fp32 and dynamic int8), the LSTM baseline (word embedding
table) and the BERT teacher (``--bert-size``, default BERT-base shape), all models of a batch size
timed together by the one interleaved timer (:func:`lightning_eff.measure.time_interleaved`; a
BERT that takes seconds per call at batch 32 in a run of its own, with fewer rounds). Latencies of
the projection models include the Python hashing. Also: projection throughput (tokens/s, fresh
cache, batches of 64 glosses; uncached, fresh and warm cache interleaved, the fastest pass) and
depthwise-separable vs standard convolution parameter/MAC ratios for one 256->256 3x3 layer at
14x14 and for MobileNetV2 vs ``plain_cnn`` (32x32 input).

``--accuracy`` also trains each model briefly on WordNet supersenses (plain PyTorch loop,
AdamW, length-bucketed batches of 64; ``--train-examples``/``--epochs``) and reports test
accuracy beside the TF-IDF + linear SVM baseline on the same training examples.

Final line: ``RESULT pqrnn_smaller_than_bert=<x> pqrnn_smaller_than_lstm=<x> dwsep_param_ratio=<r>
dwsep_mac_ratio=<r> projection_tokens_per_s=<n> noisy=<0|1>`` where the size ratios are fp32 bytes of the
baseline / fp32 bytes of pQRNN and the dwsep ratios are standard / separable (how many times
fewer), i.e. ``1 / (1/C_out + 1/9)`` for the layer; ``noisy=1`` when the throughput came from
timing rounds that disagree.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from typing import Any

import torch
import torch.nn.functional as F

from lightning_eff.batch import call_with_inputs
from lightning_eff.bench.common import Timings, bench_parser, set_threads, write_bench
from lightning_eff.measure import (
    count_macs,
    format_table,
    measure_footprint,
)
from lightning_eff.measure.timing import inference

log = logging.getLogger(__name__)

FALLBACK_TEXTS = [
    "a hand tool for driving nails", "a small rodent with a long tail", "the act of moving something from one place to another",
    "a person who writes novels", "a feeling of great happiness", "an early stage of development",
]


def _data(need_wordpiece: bool):
    """WordNet datamodules (raw text and WordPiece) or ``None`` when WordNet is not installed."""
    from lightning_eff.data import WordNetSupersenseDataModule

    try:
        raw = WordNetSupersenseDataModule(tokenizer="raw")
        raw.setup()
    except FileNotFoundError as err:
        log.warning("WordNet not available (%s); using built-in sample sentences", err)
        return None, None
    wp = None
    if need_wordpiece:
        wp = WordNetSupersenseDataModule(tokenizer="wordpiece")
        wp.setup()
    return raw, wp


def _models(bert_size: str, num_classes: int, vocab_size: int, train_texts: list[str]) -> dict[str, torch.nn.Module]:
    import lightning_eff.models._register_text  # noqa: F401
    from lightning_eff.compression.quantization.fx import dynamic_quantize
    from lightning_eff.models import create_model

    torch.manual_seed(0)
    pq = create_model("pqrnn", num_classes=num_classes).eval()
    pr = create_model("prado", num_classes=num_classes).eval()
    lstm = create_model("lstm", num_classes=num_classes).eval()
    lstm.fit_vocabulary(train_texts)
    bert = create_model("bert_teacher", num_classes=num_classes, vocab_size=vocab_size, size=bert_size).eval()
    return {"pqrnn": pq, "pqrnn_int8": dynamic_quantize(pq), "prado": pr, "prado_int8": dynamic_quantize(pr),
            "lstm": lstm, f"bert_{bert_size}": bert}


def _projection_throughput(texts: list[str], timer: Timings, threads: int, rounds: int, batch: int = 64) -> dict[str, float]:
    """Tokens/s of one pass over ``texts`` in batches: no cache, a fresh cache (built in the pass), a warm cache.

    The three passes are timed interleaved (timing ``"projection"``: ``rounds`` rounds of two passes
    each); the fastest pass of each counts.
    """
    from lightning_eff.models.projection import TernaryProjection, tokenize

    tokens = sum(len(tokenize(t, 64)) for t in texts)

    def run(proj: TernaryProjection | None) -> None:
        proj = proj if proj is not None else TernaryProjection(cache_size=16384)  # fresh: a new cache every pass
        for i in range(0, len(texts), batch):
            proj(texts[i : i + batch])

    warm = TernaryProjection(cache_size=16384)  # the warm-up pass fills its cache
    passes = {"uncached": functools.partial(run, TernaryProjection(cache_size=0)),
              "fresh_cache": functools.partial(run, None), "warm_cache": functools.partial(run, warm)}
    timing = timer.time("projection", passes, rounds=rounds, repeats=2, warmup=1, threads=threads)
    out: dict[str, float] = {f"tokens_per_s_{name}": tokens / (v.min_ms / 1000.0) for name, v in timing.items()}
    out["tokens"] = tokens
    return out


def _bucketed(n: int, lengths: list[int], batch: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length (sort within chunks of 50 batches): far less padding."""
    order = list(range(n))
    rng.shuffle(order)
    batches = []
    for start in range(0, n, batch * 50):
        chunk = sorted(order[start : start + batch * 50], key=lengths.__getitem__)
        batches += [chunk[i : i + batch] for i in range(0, len(chunk), batch)]
    rng.shuffle(batches)
    return batches


def _train_eval(model: torch.nn.Module, make_inputs, train_idx: int, labels: list[int], test_inputs, test_labels: list[int],
                lengths: list[int], epochs: int, lr: float) -> dict[str, float]:
    rng = random.Random(0)
    y = torch.tensor(labels)
    steps = epochs * math.ceil(train_idx / 64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in _bucketed(train_idx, lengths, 64, rng):
            logits = make_inputs(model, idx)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    train_s = time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_labels), 256):
            pred = test_inputs(model, list(range(i, min(i + 256, len(test_labels))))).argmax(-1)
            correct += int((pred == torch.tensor(test_labels[i : i + 256])).sum())
    return {"test_acc": correct / len(test_labels), "train_seconds": train_s, "epochs": epochs}


def _accuracy(raw, wp, args) -> dict[str, Any]:
    import lightning_eff.models._register_text  # noqa: F401
    from lightning_eff.learning.baselines import tfidf_svm_fit
    from lightning_eff.models import create_model
    from lightning_eff.models.projection import tokenize

    all_texts, all_labels = raw.texts("train"), raw.labels("train")
    n = min(args.train_examples, len(all_texts))
    # A seeded random subset: the split keeps WordNet's file order, which groups synsets by class.
    keep = sorted(random.Random(0).sample(range(len(all_texts)), n))
    texts, labels = [all_texts[i] for i in keep], [all_labels[i] for i in keep]
    test_texts, test_labels = raw.texts("test"), raw.labels("test")
    lengths = [len(tokenize(t, 64)) for t in texts]
    rows: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    svm = tfidf_svm_fit(texts, labels)
    rows["tfidf_svm"] = {"test_acc": float((svm.predict(test_texts) == torch.tensor(test_labels).numpy()).mean()),
                         "train_seconds": time.perf_counter() - start}
    text_in = lambda m, idx: m([texts[i] for i in idx])  # noqa: E731
    text_test = lambda m, idx: m([test_texts[i] for i in idx])  # noqa: E731
    torch.manual_seed(0)
    for name, kwargs, lr in (("pqrnn", {}, 3e-3), ("prado", {}, 3e-3), ("lstm", {}, 2e-3)):
        model = create_model(name, num_classes=raw.num_classes, **kwargs)
        if name == "lstm":
            model.fit_vocabulary(texts)
        rows[name] = _train_eval(model, text_in, n, labels, text_test, test_labels, lengths, args.epochs, lr)
        log.info("%s: %s", name, rows[name])
    train_ds, test_ds = wp.datasets["train"], wp.datasets["test"]
    bert_in = lambda m, idx: m(**train_ds.inputs([keep[i] for i in idx]))  # noqa: E731
    bert_test = lambda m, idx: m(**test_ds.inputs(idx))  # noqa: E731
    bert = create_model("bert_teacher", num_classes=raw.num_classes, vocab_size=wp.vocab_size, size=args.accuracy_bert_size)
    rows[f"bert_{args.accuracy_bert_size}"] = _train_eval(bert, bert_in, n, labels, bert_test, test_labels,
                                                          [train_ds.ids[i] for i in keep], args.epochs, 5e-4)
    best = max(rows["lstm"]["test_acc"], rows[f"bert_{args.accuracy_bert_size}"]["test_acc"])
    return {"train_examples": n, "test_examples": len(test_labels), "rows": rows,
            "pqrnn_fraction_of_best_neural_baseline": rows["pqrnn"]["test_acc"] / best}


def main(argv: list[str]) -> dict[str, Any]:
    """Run the benchmark; returns the ``RESULT`` figures (also in ``<out>/architectures.json``)."""
    parser = bench_parser("architectures", __doc__.splitlines()[0])
    parser.add_argument("--bert-size", default="base", help="BERT teacher shape for the footprint rows (default base)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per latency, spread over up to 5 (quick) or 10 rounds (default 15 quick, 40 full)")
    parser.add_argument("--accuracy", action="store_true", help="also train each model briefly on WordNet supersenses")
    parser.add_argument("--train-examples", type=int, default=None, help="training examples for --accuracy (default all; 8000 quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs for --accuracy (default 2; 1 quick)")
    parser.add_argument("--accuracy-bert-size", default="mini", help="BERT shape trained by --accuracy (default mini: CPU budget)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    # several calls per round: the fastest of a few is robust to one preempted call, a single call is not
    warmup, repeats = (2, args.repeats or 15) if args.quick else (5, args.repeats or 40)
    if repeats < 1:
        raise SystemExit(f"--repeats={repeats} must be >= 1")
    args.train_examples = args.train_examples or (8000 if args.quick else 10**9)
    args.epochs = args.epochs or (1 if args.quick else 2)
    started = time.perf_counter()

    raw, wp = _data(need_wordpiece=True)
    texts = raw.texts("test")[:32] if raw is not None else (FALLBACK_TEXTS * 6)[:32]
    train_texts = raw.texts("train") if raw is not None else FALLBACK_TEXTS
    num_classes = raw.num_classes if raw is not None else 26
    if wp is not None:
        ids = wp.datasets["test"].inputs(list(range(32)))
        vocab_size = wp.vocab_size
    else:
        gen = torch.Generator().manual_seed(0)
        length = max(len(t.split()) for t in texts) + 2
        ids = {"input_ids": torch.randint(5, 8000, (32, length), generator=gen), "attention_mask": torch.ones(32, length, dtype=torch.long)}
        vocab_size = 8000
    models = _models(args.bert_size, num_classes, vocab_size, train_texts)

    rows: dict[str, dict[str, Any]] = {}
    inputs: dict[int, dict[str, Any]] = {1: {}, 32: {}}
    for name, model in models.items():
        is_bert = name.startswith("bert")
        b32 = ids if is_bert else texts
        b1 = {k: v[:1, : int(v[0].ne(0).sum()) if k == "input_ids" else None] for k, v in ids.items()} if is_bert else texts[:1]
        if is_bert:
            b1["attention_mask"] = b1["attention_mask"][:, : b1["input_ids"].shape[1]]
        inputs[1][name], inputs[32][name] = b1, b32
        row = measure_footprint(model, b1, batch_sizes=(), latency=False, memory=False)
        # MACs per example, averaged over the 32 glosses (an int8 model does the same MACs as its float parent).
        row["macs"] = count_macs(model, b32) // 32 if not name.endswith("int8") else rows[name[:-5]]["macs"]
        rows[name] = row
    bert_name = f"bert_{args.bert_size}"
    slow = {bert_name} if args.bert_size in ("medium", "base") else set()  # seconds per call at batch 32 on 2 cores
    timer = Timings()
    rounds = min(5 if args.quick else 10, repeats)
    per_round = max(1, repeats // rounds)
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(inference(model))
        for batch, batch_inputs in inputs.items():
            calls = {name: functools.partial(call_with_inputs, models[name], batch_inputs[name]) for name in models}
            heavy = slow if batch == 32 else set()
            groups = [(f"latency_b{batch}", {n: f for n, f in calls.items() if n not in heavy}, rounds, per_round, warmup)]
            if heavy:
                groups.append((f"latency_b{batch}_slow", {n: calls[n] for n in heavy}, min(3, rounds), 1, 1))
            for label, group, n_rounds, n_repeats, n_warmup in groups:
                timing = timer.time(label, group, rounds=n_rounds, repeats=n_repeats, warmup=n_warmup, threads=threads)
                for name, v in timing.items():
                    rows[name][f"latency_ms_b{batch}"] = v.median_ms
                    rows[name][f"latency_min_ms_b{batch}"] = v.min_ms
                    rows[name][f"latency_spread_b{batch}"] = v.spread
    for name, row in rows.items():
        log.info("%s: %s", name, row)
    print(format_table(rows, ["params", "fp32_bytes", "gzip_bytes", "macs", "latency_ms_b1", "latency_ms_b32"]))

    from lightning_eff.models.conv_cost import layer_ratios, model_ratios

    layer = layer_ratios(256, 256, kernel=3, size=14)
    whole = {f"w{w}": model_ratios(width=w, input_size=32) for w in ((0.5,) if args.quick else (0.5, 1.0))}
    proj = _projection_throughput((raw.texts("train")[: 2000 if args.quick else 20000]) if raw is not None else FALLBACK_TEXTS * 100,
                                  timer, threads, rounds=3 if args.quick else 5)
    print(f"projection: {proj['tokens_per_s_fresh_cache']:.0f} tokens/s (fresh cache), "
          f"{proj['tokens_per_s_uncached']:.0f} uncached, {proj['tokens_per_s_warm_cache']:.0f} warm")
    print(f"depthwise-separable 256->256 3x3 @14x14: params x{1 / layer['measured_param_ratio']:.2f} fewer, "
          f"MACs x{1 / layer['measured_mac_ratio']:.2f} fewer; whole MobileNetV2 vs plain_cnn: "
          + ", ".join(f"{k}: params x{1 / v['param_ratio']:.1f}, MACs x{1 / v['mac_ratio']:.1f}" for k, v in whole.items()))

    accuracy = None
    if args.accuracy:
        if raw is None:
            log.warning("--accuracy needs WordNet (apt-get install -y wordnet-base); skipped")
        else:
            accuracy = _accuracy(raw, wp, args)
            print(format_table(accuracy["rows"], ["test_acc", "train_seconds"]))
            print(f"pQRNN reaches {100 * accuracy['pqrnn_fraction_of_best_neural_baseline']:.1f}% of the better of LSTM / BERT "
                  f"({accuracy['train_examples']} training examples, {args.epochs} epoch(s))")

    pq = rows["pqrnn"]["fp32_bytes"]
    result = {
        "pqrnn_smaller_than_bert": rows[bert_name]["fp32_bytes"] / pq,
        "pqrnn_smaller_than_lstm": rows["lstm"]["fp32_bytes"] / pq,
        "dwsep_param_ratio": 1.0 / layer["measured_param_ratio"],
        "dwsep_mac_ratio": 1.0 / layer["measured_mac_ratio"],
        "projection_tokens_per_s": timer.figure("projection_tokens_per_s", int(proj["tokens_per_s_fresh_cache"]),
                                                [("projection", "fresh_cache")]),
    }
    payload = {
        "settings": {"quick": args.quick, "threads": threads, "warmup": warmup, "repeats": repeats, "rounds": rounds,
                     "repeats_per_round": per_round, "slow_models": sorted(slow), "bert_size": args.bert_size,
                     "inputs": "32 WordNet test glosses" if raw is not None else "built-in sample sentences"},
        "rows": rows,
        "int8_ratios": {"pqrnn_int8_smaller_than_bert": rows[bert_name]["fp32_bytes"] / rows["pqrnn_int8"]["fp32_bytes"],
                        "pqrnn_int8_smaller_than_lstm": rows["lstm"]["fp32_bytes"] / rows["pqrnn_int8"]["fp32_bytes"]},
        "projection": proj,
        "dwsep_layer": layer,
        "dwsep_models": whole,
        "accuracy": accuracy,
        "seconds": time.perf_counter() - started,
    }
    write_bench("architectures", payload, result, out_dir=args.out, timings=timer)
    return result
