"""The benchmark convention shared by every ``python -m lightning_eff.bench <name>``.

Each benchmark measures its variants side by side in one process (warm-up, repeats, median, a
fixed thread count), writes ``<out>/<name>.json`` atomically and prints one final line
``RESULT key=value ...`` that scripts and the README tables parse. ``--quick`` keeps a run to
about a minute on 2 cores.

Example:
    >>> parser = bench_parser("footprint", "Footprint of the baseline model.")
    >>> args = parser.parse_args(["--quick"])
    >>> args.quick, args.threads, args.out
    (True, 2, 'bench_results')
    >>> print(format_result_line({"params": 12, "latency_ms_b1": 0.123456}))
    RESULT params=12 latency_ms_b1=0.1235
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_eff.infra.footprint import cpu_flags, write_results

__all__ = ["bench_parser", "set_threads", "environment", "format_result_line", "write_bench"]

DEFAULT_OUT = "bench_results"


def bench_parser(name: str, description: str = "") -> argparse.ArgumentParser:
    """An ``argparse`` parser with the options every benchmark shares.

    ``--quick`` (about a minute on 2 cores), ``--threads`` (``torch.set_num_threads``, default 2)
    and ``--out`` (directory of the JSON results, default ``bench_results/``). Benchmarks add
    their own options to the returned parser.
    """
    parser = argparse.ArgumentParser(prog=f"python -m lightning_eff.bench {name}", description=description)
    parser.add_argument("--quick", action="store_true", help="small settings that finish in about a minute")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for every measurement (default 2)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"directory for <name>.json (default {DEFAULT_OUT}/)")
    return parser


def set_threads(threads: int) -> int:
    """Fix the intra-op thread count for the whole benchmark (numbers are only comparable at equal threads)."""
    if threads < 1:
        raise SystemExit(f"--threads={threads} must be >= 1")
    torch.set_num_threads(threads)
    return threads


def environment() -> dict[str, Any]:
    """What the numbers depend on: versions, CPU, thread count, quantization engines."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "quantized_engines": list(torch.backends.quantized.supported_engines),
        "cpu": cpu_flags(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "nan"
    return str(value).replace(" ", "_")


def format_result_line(result: Mapping[str, Any]) -> str:
    """``RESULT k=v k=v ...``: floats with 4 significant digits, ``None`` as ``none``."""
    return " ".join(["RESULT", *(f"{key}={_format_value(value)}" for key, value in result.items())])


def write_bench(name: str, payload: Mapping[str, Any], result: Mapping[str, Any], out_dir: str | os.PathLike = DEFAULT_OUT) -> Path:
    """Write ``<out_dir>/<name>.json`` atomically and print the final ``RESULT`` line.

    The JSON holds ``{"benchmark": name, "result": result, "environment": ..., "details": payload}``.

    Args:
        name: benchmark name (the module name under ``lightning_eff.bench``).
        payload: everything measured (per-variant rows, settings).
        result: the headline figures, printed on the ``RESULT`` line in this order.
        out_dir: directory for the JSON file.

    Returns:
        The path written.
    """
    path = write_results(
        Path(out_dir) / f"{name}.json",
        {"benchmark": name, "result": dict(result), "environment": environment(), "details": dict(payload)},
    )
    sys.stdout.write(format_result_line(result) + "\n")
    sys.stdout.flush()
    return path
