"""Footprint metrics: parameters, sparsity, size, MACs, latency and memory of a model.

The survey (Menghani, "Efficient Deep Learning", 2021, §2) names the footprint metrics every
efficiency technique is judged by: model size (parameters, bytes on disk and compressed),
inference latency, compute (MACs/FLOPs) and memory. Quality alone says nothing about whether a
pruned or quantized model is worth shipping, so every run reports these beside its accuracy.

Everything here is plain PyTorch and works on float, pruned (``weight_orig``/``weight_mask``),
``torch.ao`` quantized (eager, FX, dynamic) and TorchScript models; :func:`measure_footprint`
turns a failure of one measurement into ``None`` (with a logged warning) rather than an exception.

Inputs follow one convention throughout: a tensor is passed as the single argument, a tuple is
unpacked as positional arguments, a dict as keyword arguments; anything else (e.g. a list of
strings for a text model) is passed as one argument.

Example:
    >>> from torch import nn

from lightning_eff.batch import resize_batch
from lightning_eff.validation import check_int
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> count_parameters(net), count_macs(net, torch.zeros(1, 4))
    (23, 18)
    >>> report = measure_footprint(net, torch.zeros(1, 4), repeats=3, threads=1)
    >>> print(format_table({"fp32": report}, ["params", "macs"]))
    variant  params     macs
    -------  ------  -------
    fp32         23  18 MACs
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from lightning_eff.batch import resize_batch
from lightning_eff.measure.counts import (
    count_macs,
    count_nonzero_parameters,
    count_parameters,
    gzip_size,
    serialize_state_dict,
)
from lightning_eff.measure.memory import peak_memory_mb
from lightning_eff.measure.timing import measure_latency
from lightning_eff.validation import check_int

__all__ = ["measure_footprint", "format_table"]

log = logging.getLogger(__name__)



def _attempt(key: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:  # a failed measurement must never kill a training run
        log.warning("footprint: %s could not be measured for this model (%s: %s); reporting None", key, type(err).__name__, err)
        return None




def measure_footprint(
    model: Callable[..., Any],
    example_inputs: Any,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    latency: bool = True,
    memory: bool = True,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, Any]:
    """All footprint metrics of ``model`` in one flat dict.

    Keys: ``params``, ``nonzero_params``, ``sparsity`` (fraction of zero parameters),
    ``fp32_bytes`` (bytes of the saved state_dict, whatever its dtypes), ``gzip_bytes``, ``macs``
    (batch 1), ``latency_ms_b<N>`` per batch size, ``peak_mem_mb``. A measurement that fails
    for this model type (e.g. MACs of a TorchScript int8 module) is ``None`` with a warning.

    Args:
        model: the model (float, pruned, quantized, TorchScript) or a callable.
        example_inputs: one example batch of size 1; batches of other sizes repeat it along dim 0.
        batch_sizes: batch sizes to time.
        latency: measure latencies (keys are ``None`` when False).
        memory: measure the forward's peak memory (``None`` when False).
        warmup: untimed calls before timing.
        repeats: timed calls; medians are reported.
        threads: thread count during timing (None keeps the current).

    Raises:
        ConfigError: bad ``batch_sizes``, ``warmup``, ``repeats`` or ``threads``.
    """
    for batch in batch_sizes:
        check_int("batch_sizes[]", batch, low=1)
    check_int("warmup", warmup, low=0)
    check_int("repeats", repeats, low=1)
    check_int("threads", threads, low=1, allow_none=True)
    module = model if isinstance(model, nn.Module) else None
    static = module is not None  # sizes need a module's state_dict; a plain callable has none
    params = _attempt("params", lambda: count_parameters(module)) if static else None
    nonzero = _attempt("nonzero_params", lambda: count_nonzero_parameters(module)) if static else None
    blob = _attempt("fp32_bytes", lambda: serialize_state_dict(module)) if static else None
    report: dict[str, Any] = {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": None if params is None or nonzero is None else (1.0 - nonzero / params if params else 0.0),
        "fp32_bytes": None if blob is None else len(blob),
        "gzip_bytes": None if blob is None else _attempt("gzip_bytes", lambda: gzip_size(blob)),
        "macs": _attempt("macs", lambda: count_macs(model, example_inputs)),
    }
    for batch in map(int, batch_sizes):
        key = f"latency_ms_b{batch}"
        inputs = resize_batch(example_inputs, batch)
        report[key] = _attempt(key, lambda: measure_latency(model, inputs, warmup=warmup, repeats=repeats, threads=threads)) if latency else None
    report["peak_mem_mb"] = _attempt("peak_mem_mb", lambda: peak_memory_mb(model, example_inputs)) if memory else None
    return report


def _scaled(value: float, steps: tuple[tuple[float, str], ...], last: str) -> str:
    for scale, unit in steps:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}".rstrip()
    return f"{value:.4g} {last}".rstrip()


_COUNT = ((1e9, "G"), (1e6, "M"), (1e3, "K"))
_BYTES = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def _format_cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if column.endswith("_bytes"):
        return _scaled(value, _BYTES, "B")
    if column.startswith("latency_ms"):
        return f"{value:.3g} ms"
    if column.endswith("_mb"):
        return f"{value:.3g} MiB"
    if column == "sparsity":
        return f"{100.0 * value:.1f} %"
    if column == "macs":
        return _scaled(value, tuple((scale, f"{unit}MACs") for scale, unit in _COUNT), "MACs")
    if column.endswith("params"):
        return _scaled(value, _COUNT, "")
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A fixed-width table, one row per variant (e.g. ``fp32``, ``ptq_int8``), human units.

    Args:
        rows: variant name -> metrics (as returned by :func:`measure_footprint`, plus e.g. accuracy).
        columns: columns to show, in order (default: every key, in order of first appearance).
            Missing values and ``None`` show as ``-``.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    header = ["variant", *columns]
    body = [[str(name), *(_format_cell(col, row.get(col)) for col in columns)] for name, row in rows.items()]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))).rstrip()

    return "\n".join([render(header), "  ".join("-" * w for w in widths), *(render(line) for line in body)])



