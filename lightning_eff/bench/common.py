"""The benchmark convention shared by every ``python -m lightning_eff.bench <name>``.

Each benchmark measures its variants side by side in one process, through the one interleaved
timer (:func:`lightning_eff.measure.time_interleaved`: warm-up, rounds, a fixed thread count,
minimum, median and spread per variant), writes ``<out>/<name>.json`` atomically and prints one
final line ``RESULT key=value ...`` that scripts and the README tables parse. ``--quick`` keeps a
run to about a minute on 2 cores.

A benchmark collects its timings in a :class:`Timings` and derives its headline figures through
it (:meth:`Timings.ratio`, :meth:`Timings.figure`), so it knows which timed variants every figure
came from. :func:`write_bench` then puts every timing row (min, median, spread, noisy per variant)
into the JSON under ``"timings"`` and ends the ``RESULT`` line with ``noisy=1`` when any headline
figure came from a noisy variant (rounds more than ``max_spread`` apart), ``noisy=0`` otherwise;
the JSON names the noisy variants and the figures they touched. A noisy figure is never printed
as a clean one.

Example:
    >>> parser = bench_parser("footprint", "Footprint of the baseline model.")
    >>> args = parser.parse_args(["--quick"])
    >>> args.quick, args.threads, args.out
    (True, 2, 'bench_results')
    >>> print(format_result_line({"params": 12, "latency_ms_b1": 0.123456}))
    RESULT params=12 latency_ms_b1=0.1235
    >>> timings = Timings()
    >>> run = timings.time("demo", {"a": lambda: None, "b": lambda: None}, rounds=3, repeats=2, warmup=1,
    ...                    max_spread=1e9)  # a generous threshold: never noisy
    >>> result = {"a_vs_b": timings.ratio("a_vs_b", "demo", "a", "b")}
    >>> print(format_result_line(mark_noisy(result, timings)).split()[-1])
    noisy=0
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_eff.atomic import write_results
from lightning_eff.errors import ConfigError
from lightning_eff.measure import TimingResult, cpu_flags, time_interleaved, time_models

__all__ = ["bench_parser", "set_threads", "environment", "format_result_line", "write_bench", "Timings", "mark_noisy"]

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
    """What the numbers depend on: versions, CPU (``torch.backends.cpu.get_cpu_capability()`` and the
    AVX2 / AVX-512 / VNNI / AMX flags, :func:`lightning_eff.measure.cpu_flags`), thread count,
    quantization engines, load average."""
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


class Timings:
    """Every interleaved timing of one benchmark run, and which timed variants each headline figure came from.

    ``time`` / ``time_models`` / ``add`` store a :class:`~lightning_eff.measure.TimingResult` under
    a label; ``ratio`` and ``figure`` return a headline value and record its sources
    (``(label, variant)`` pairs). :func:`write_bench` writes :meth:`summary` to the JSON and
    :func:`mark_noisy` adds ``noisy=0|1`` to the ``RESULT`` line.
    """

    def __init__(self) -> None:
        self.runs: dict[str, TimingResult] = {}
        self.sources: dict[str, list[tuple[str, str]]] = {}

    def add(self, label: str, result: TimingResult) -> TimingResult:
        """Store ``result`` under ``label`` (unique within the run); return it."""
        if label in self.runs:
            raise ConfigError(f"timing label={label!r} is already used; labels so far: {list(self.runs)}.")
        if not isinstance(result, TimingResult):
            raise ConfigError(f"timing {label!r}: result={type(result).__name__} must be a TimingResult (time_interleaved).")
        self.runs[label] = result
        return result

    def time(self, label: str, variants: Mapping[str, Callable[[], Any]], **kwargs: Any) -> TimingResult:
        """:func:`~lightning_eff.measure.time_interleaved` of zero-argument callables, stored under ``label``."""
        return self.add(label, time_interleaved(variants, **kwargs))

    def time_models(self, label: str, models: Mapping[str, Callable[..., Any]], example_inputs: Any, **kwargs: Any) -> TimingResult:
        """:func:`~lightning_eff.measure.time_models` (models on example inputs, eval + no_grad), stored under ``label``."""
        return self.add(label, time_models(models, example_inputs, **kwargs))

    def _check_source(self, label: str, variant: str) -> None:
        if label not in self.runs:
            raise ConfigError(f"timing label={label!r} was never timed; labels are {list(self.runs)}.")
        if variant not in self.runs[label]:
            raise ConfigError(f"timing {label!r} has no variant {variant!r}; variants are {list(self.runs[label])}.")

    def figure(self, key: str, value: Any, sources: Iterable[tuple[str, str]]) -> Any:
        """Record that headline figure ``key`` (``value``, returned unchanged) came from the timed ``sources``."""
        pairs = [(str(label), str(variant)) for label, variant in sources]
        for label, variant in pairs:
            self._check_source(label, variant)
        self.sources.setdefault(key, [])
        self.sources[key] += [p for p in pairs if p not in self.sources[key]]
        return value

    def ratio(self, key: str, label: str, numerator: str, denominator: str, stat: str = "min_ms") -> float:
        """Headline ``key`` = ``numerator``'s ``stat`` / ``denominator``'s in timing ``label``, sources recorded."""
        self._check_source(label, numerator)
        self._check_source(label, denominator)
        return self.figure(key, self.runs[label].ratio(numerator, denominator, stat), [(label, numerator), (label, denominator)])

    def noisy_variants(self) -> list[str]:
        """``"label/variant"`` of every noisy variant timed in this run."""
        return [f"{label}/{name}" for label, run in self.runs.items() for name in run.noisy_variants]

    def noisy_figures(self) -> dict[str, list[str]]:
        """``{headline key: ["label/variant", ...]}`` for the figures that came from a noisy variant."""
        out = {}
        for key, pairs in self.sources.items():
            bad = [f"{label}/{variant}" for label, variant in pairs if self.runs[label][variant].noisy]
            if bad:
                out[key] = bad
        return out

    @property
    def noisy(self) -> bool:
        """Whether any headline figure came from a noisy variant."""
        return bool(self.noisy_figures())

    def summary(self) -> dict[str, Any]:
        """The JSON block: every run's rows, the threshold, the noisy variants and the figures they touched."""
        return {
            "spread": "relative range of the per-round minima, (max - min) / min; noisy when above max_spread",
            "noisy": self.noisy,
            "noisy_figures": self.noisy_figures(),
            "noisy_variants": self.noisy_variants(),
            "figure_sources": {key: [f"{label}/{variant}" for label, variant in pairs] for key, pairs in self.sources.items()},
            "runs": {label: {"max_spread": run.max_spread, "threads": run.threads, "warmup": run.warmup, "variants": run.rows()}
                     for label, run in self.runs.items()},
        }


def mark_noisy(result: Mapping[str, Any], timings: Timings) -> dict[str, Any]:
    """``result`` with ``noisy=1`` last when any of its figures came from a noisy timing, else ``noisy=0``.

    A key recorded in ``timings`` but missing from ``result`` (or ``None`` there) does not count.
    """
    if "noisy" in result:
        raise ConfigError("result key 'noisy' is reserved for the noise flag; rename the figure.")
    touched = [k for k in timings.noisy_figures() if result.get(k) is not None]
    return {**result, "noisy": 1 if touched else 0}


def format_result_line(result: Mapping[str, Any]) -> str:
    """``RESULT k=v k=v ...``: floats with 4 significant digits, ``None`` as ``none``."""
    return " ".join(["RESULT", *(f"{key}={_format_value(value)}" for key, value in result.items())])


def write_bench(name: str, payload: Mapping[str, Any], result: Mapping[str, Any], out_dir: str | os.PathLike = DEFAULT_OUT,
                timings: Timings | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` atomically and print the final ``RESULT`` line.

    The JSON holds ``{"benchmark": name, "result": result, "environment": ..., "details": payload}``.
    With ``timings``, ``result`` gets ``noisy=0|1`` last (:func:`mark_noisy`) and ``details`` gets
    ``"timings"`` (:meth:`Timings.summary`: every timing row, the noisy variants and the figures
    they touched).

    Args:
        name: benchmark name (the module name under ``lightning_eff.bench``).
        payload: everything measured (per-variant rows, settings).
        result: the headline figures, printed on the ``RESULT`` line in this order.
        out_dir: directory for the JSON file.
        timings: the benchmark's timings, when its figures came from the interleaved timer.

    Returns:
        The path written.
    """
    details = dict(payload)
    if timings is not None:
        result = mark_noisy(result, timings)
        details["timings"] = timings.summary()
    path = write_results(
        Path(out_dir) / f"{name}.json",
        {"benchmark": name, "result": dict(result), "environment": environment(), "details": details},
    )
    sys.stdout.write(format_result_line(result) + "\n")
    sys.stdout.flush()
    return path
