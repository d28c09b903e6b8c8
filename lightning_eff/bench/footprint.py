"""Footprint of the baseline model: ``python -m lightning_eff.bench footprint [--quick]``.

Measures the ``mobilenet_baseline`` recipe's network (timm MobileNetV2, width 0.5, 10 classes,
1 input channel, stride-1 stem) at 1×1×32×32 and, for reference, the same network at width 1.0:
parameters, state_dict bytes (raw and gzip), MACs, median CPU latency at batch 1 and 32 (both
networks timed together by the one interleaved timer, :func:`lightning_eff.measure.time_models`;
minimum and spread beside it), and the peak memory of one forward. These are the figures every
compressed variant is compared with.

Prints ``RESULT params=<n> fp32_bytes=<n> macs=<n> latency_ms_b1=<ms> noisy=<0|1>`` for the
baseline; the full rows are in ``bench_results/footprint.json``.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lightning_eff.batch import resize_batch
from lightning_eff.bench.common import Timings, bench_parser, set_threads, write_bench
from lightning_eff.measure import format_table, measure_footprint
from lightning_eff.models import create_model

log = logging.getLogger(__name__)

INPUT_SHAPE = (1, 1, 32, 32)
VARIANTS = {  # name -> create_model kwargs (the mobilenet_baseline recipe's model first)
    "mnv2_w0.5": dict(width=0.5, num_classes=10, in_chans=1, small_input_stages=1),
    "mnv2_w1.0": dict(width=1.0, num_classes=10, in_chans=1, small_input_stages=1),
}


def main(argv: list[str]) -> dict[str, Any]:
    """Run the benchmark; returns the ``RESULT`` figures (also written to ``<out>/footprint.json``)."""
    parser = bench_parser("footprint", __doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes to time (default 1 32)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per latency, spread over up to 5 (quick) or 10 rounds (default 10 quick, 50 full)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    warmup, repeats = (3, args.repeats or 10) if args.quick else (10, args.repeats or 50)
    if repeats < 1:
        raise SystemExit(f"--repeats={repeats} must be >= 1")
    rounds = min(5 if args.quick else 10, repeats)
    per_round = max(1, repeats // rounds)

    torch.manual_seed(0)
    example = torch.randn(*INPUT_SHAPE)
    rows: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    models = {}
    for name, kwargs in VARIANTS.items():
        models[name] = create_model("mobilenetv2", **kwargs).eval()
        rows[name] = measure_footprint(models[name], example, batch_sizes=(), latency=False)
    timer = Timings()
    for batch in args.batch_sizes:
        timing = timer.time_models(f"latency_b{batch}", models, resize_batch(example, batch), rounds=rounds, repeats=per_round,
                                   warmup=warmup, threads=threads)
        for name, v in timing.items():
            rows[name][f"latency_ms_b{batch}"] = v.median_ms
            rows[name][f"latency_min_ms_b{batch}"] = v.min_ms
            rows[name][f"latency_spread_b{batch}"] = v.spread
    elapsed = time.perf_counter() - started
    print(format_table(rows))

    base = rows["mnv2_w0.5"]
    result = {
        "params": base["params"],
        "fp32_bytes": base["fp32_bytes"],
        "macs": base["macs"],
        "latency_ms_b1": base.get("latency_ms_b1"),
    }
    if "latency_b1" in timer.runs:
        timer.figure("latency_ms_b1", result["latency_ms_b1"], [("latency_b1", "mnv2_w0.5")])
    payload = {
        "settings": {
            "input_shape": list(INPUT_SHAPE),
            "batch_sizes": args.batch_sizes,
            "warmup": warmup,
            "repeats": repeats,
            "rounds": rounds,
            "repeats_per_round": per_round,
            "threads": threads,
            "quick": args.quick,
            "models": {name: dict(model="mobilenetv2", **kwargs) for name, kwargs in VARIANTS.items()},
        },
        "baseline": "mnv2_w0.5",
        "rows": rows,
        "seconds": elapsed,
    }
    write_bench("footprint", payload, result, out_dir=args.out, timings=timer)
    return result
