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

import contextlib
import gzip
import io
import json
import logging
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_int

__all__ = [
    "cpu_capability",
    "cpu_flags",
    "count_parameters", "count_nonzero_parameters", "serialize_state_dict", "state_dict_bytes", "gzip_size",
    "file_bytes", "count_macs", "call_with_inputs", "resize_batch", "batch_rows", "batch_len", "measure_latency", "measure_latencies",
    "peak_memory_mb", "process_peak_rss_mb", "interleaved_min_ms", "interleaved_times", "measure_footprint", "format_table", "write_results",
]

log = logging.getLogger(__name__)
_MiB = float(2**20)
_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original$")


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _weight_tensors(model: nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(stored, effective)`` for every unique weight-like tensor of ``model``.

    ``stored`` is what occupies memory; ``effective`` is the weight the forward pass uses
    (``orig * mask`` for a pruning reparametrization, the dequantized values of an int8 weight).

    Why the state_dict and not ``.parameters()``: converted ``torch.ao`` modules keep their
    weights in packed params (a C++ object) that ``.parameters()`` does not see; their
    ``state_dict`` unpacks them as quantized tensors or ``(weight, bias)`` tuples. Buffers (BN
    statistics, pruning masks, observer state) and quantization metadata (scale, zero_point)
    are not parameters and are skipped.
    """
    state = model.state_dict(keep_vars=True)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    seen: set[int] = set()
    for key, value in state.items():
        leaf = key.rsplit(".", 1)[-1]
        if key in params:
            tensors = [value]
        elif key in buffers:
            continue
        elif isinstance(value, (tuple, list)):  # packed params of quantized Linear: (weight, bias)
            tensors = [t for t in _flatten(value) if isinstance(t, Tensor)]
        elif isinstance(value, Tensor) and (value.is_quantized or leaf in ("weight", "bias")):
            tensors = [value]  # quantized conv weight/bias written by _save_to_state_dict
        else:
            continue
        for tensor in tensors:
            if id(tensor) in seen:  # tied weights appear under several keys as the same object
                continue
            seen.add(id(tensor))
            yield tensor, _effective(model, state, key, tensor)
    if isinstance(model, torch.jit.ScriptModule):
        for tensor in _scripted_packed_tensors(model):
            yield tensor, tensor.dequantize() if tensor.is_quantized else tensor.detach()


def _scripted_packed_tensors(model: torch.jit.ScriptModule) -> Iterator[Tensor]:
    """Weights a scripted quantized model keeps in packed-params ScriptObjects (absent from its state_dict).

    Their ``__getstate__`` holds the weight (quantized) and bias (float) besides integer
    configuration tensors (stride, padding), which are not parameters and are skipped.
    """
    for _, module in model.named_modules():
        for attr in ("_packed_params", "_packed_weight"):
            if not module._c.hasattr(attr):
                continue
            packed = module._c.getattr(attr)
            if not isinstance(packed, torch.ScriptObject):
                continue
            try:
                state = packed.__getstate__()
            except (AttributeError, RuntimeError):
                continue
            for item in _flatten(state):
                if isinstance(item, Tensor) and (item.is_quantized or item.is_floating_point()):
                    yield item


def _effective(model: nn.Module, state: Mapping[str, Any], key: str, tensor: Tensor) -> Tensor:
    if tensor.is_quantized:
        # (q - zero_point) * scale is exactly 0.0 for a weight that quantized to its zero point.
        return tensor.dequantize()
    if key.endswith("_orig") and isinstance(state.get(key[: -len("_orig")] + "_mask"), Tensor):
        return tensor.detach() * state[key[: -len("_orig")] + "_mask"]  # torch.nn.utils.prune
    match = _PARAMETRIZED.match(key)
    if match:  # torch.nn.utils.parametrize: the effective tensor is the parametrized attribute
        return getattr(model.get_submodule(match.group(1) or ""), match.group(2)).detach()
    return tensor.detach()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; shared tensors once, a pruned ``weight_orig`` as the weight it stands for.

    Works for quantized (converted) models, whose weights are read from the state_dict.
    """
    return sum(stored.numel() for stored, _ in _weight_tensors(model))


def count_nonzero_parameters(model: nn.Module) -> int:
    """Number of non-zero entries of the *effective* weights (``orig * mask`` when pruned)."""
    return sum(int(torch.count_nonzero(effective)) for _, effective in _weight_tensors(model))


def serialize_state_dict(model: nn.Module) -> bytes:
    """``torch.save(model.state_dict())`` into memory: the bytes a checkpoint of the weights takes."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def state_dict_bytes(model: nn.Module) -> int:
    """Size in bytes of ``torch.save(model.state_dict())``."""
    return len(serialize_state_dict(model))


def gzip_size(data: bytes | bytearray | str | os.PathLike) -> int:
    """Size after gzip at level 9 of ``data`` (bytes) or of the file at ``data`` (path).

    Compressed size is the survey's proxy for the download cost of a sparse or clustered model:
    zeros and repeated values compress, dense float noise does not.
    """
    if not isinstance(data, (bytes, bytearray)):
        data = Path(data).read_bytes()
    return len(gzip.compress(bytes(data), compresslevel=9, mtime=0))


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a file on disk in bytes."""
    return os.path.getsize(path)


def call_with_inputs(fn: Callable[..., Any], inputs: Any) -> Any:
    """Call ``fn`` with ``inputs``: tuple -> ``*args``, dict -> ``**kwargs``, anything else -> one argument."""
    if isinstance(inputs, tuple):
        return fn(*inputs)
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    return fn(inputs)


def resize_batch(inputs: Any, batch_size: int) -> Any:
    """Make a batch of ``batch_size`` from an example batch by repeating (or slicing) along dim 0.

    Row ``i`` of the result is row ``i % n`` of the example, so a batch of 1 becomes a batch of
    32 copies and a batch of 16 becomes its first example. Tensors of any rank >= 1, lists of
    strings and the values of dicts / items of tuples are resized; other values pass through.
    """
    check_int("batch_size", batch_size, low=1)
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            return inputs
        index = torch.arange(batch_size, device=inputs.device) % inputs.shape[0]
        return inputs.index_select(0, index)
    if isinstance(inputs, Mapping):
        return {key: resize_batch(value, batch_size) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(resize_batch(value, batch_size) for value in inputs)
    if isinstance(inputs, list) and inputs and all(isinstance(item, str) for item in inputs):
        return [inputs[i % len(inputs)] for i in range(batch_size)]
    if isinstance(inputs, list):
        return [resize_batch(value, batch_size) for value in inputs]
    return inputs


def batch_rows(inputs: Any, start: int, stop: int | None = None) -> Any:
    """Rows ``start:stop`` of a batch: tensors and lists along dim 0, dict values and tuple items alike."""
    if isinstance(inputs, (Tensor, list)):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {key: batch_rows(value, start, stop) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(batch_rows(value, start, stop) for value in inputs)
    return inputs


def batch_len(inputs: Any) -> int:
    """Number of rows of a batch (tensor, list, or the first value of a dict / tuple)."""
    if isinstance(inputs, (Tensor, list)):
        return len(inputs)
    values = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs) if isinstance(inputs, tuple) else []
    if not values:
        raise ConfigError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}.")
    return batch_len(values[0])


def _first_tensor(inputs: Any) -> Tensor | None:
    values = inputs.values() if isinstance(inputs, Mapping) else _flatten(inputs)
    for value in values:
        found = value if isinstance(value, Tensor) else None
        if found is None and isinstance(value, (Mapping, tuple, list)):
            found = _first_tensor(value)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def _inference(model: Any) -> Iterator[None]:
    """eval() + no_grad, restoring every submodule's own mode afterwards (a frozen teacher stays eval)."""
    # (a frozen TorchScript module has no ``training`` attribute left to switch)
    modes = [(m, m.training) for m in model.modules() if hasattr(m, "training")] if isinstance(model, nn.Module) else []
    for module, _ in modes:
        module.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _quantized_macs_hooks(model: nn.Module, total: list[int]) -> list[Any]:
    """Count MACs of converted ``torch.ao`` conv/linear modules, which FlopCounterMode does not see.

    The quantized kernels dispatch to ``quantized::conv2d``/``linear`` ops that have no FLOP
    formula; an int8 model does the same multiply-accumulates as its float parent, so we count
    them from the module shapes: conv = out.numel() * in_channels/groups * prod(kernel), linear =
    out.numel() * in_features.
    """
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd

    conv_types = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.ConvTranspose1d, nnq.ConvTranspose2d, nnq.ConvTranspose3d)
    linear_types = (nnq.Linear, nnqd.Linear)

    def conv_hook(module: nn.Module, _args: Any, out: Tensor) -> None:
        total[0] += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def linear_hook(module: nn.Module, _args: Any, out: Tensor) -> None:
        total[0] += out.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, conv_types):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, linear_types):
            handles.append(module.register_forward_hook(linear_hook))
    return handles


def count_macs(model: Callable[..., Any], example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (eval mode, no grad).

    Uses ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per MAC for matmul
    and conv), plus shape-based counts for converted quantized conv/linear modules.

    Raises:
        RuntimeError: the model holds quantized weights but nothing was counted (e.g. a
            TorchScript int8 module, whose quantized ops neither the counter nor hooks see).
    """
    from torch.utils.flop_counter import FlopCounterMode

    quantized_macs = [0]
    handles = _quantized_macs_hooks(model, quantized_macs) if isinstance(model, nn.Module) else []
    try:
        with _inference(model), FlopCounterMode(display=False) as counter:
            call_with_inputs(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    macs = counter.get_total_flops() // 2 + quantized_macs[0]
    if macs == 0 and isinstance(model, nn.Module) and any(s.is_quantized for s, _ in _weight_tensors(model)):
        raise RuntimeError(f"cannot count MACs of {type(model).__name__}: its quantized ops are invisible to FlopCounterMode")
    return int(macs)


def measure_latency(
    fn_or_model: Callable[..., Any],
    example_inputs: Any,
    *,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> float:
    """Median wall-clock milliseconds of one call, after ``warmup`` untimed calls.

    The median resists the odd slow run (page faults, a neighbour process); a fixed thread count
    makes numbers comparable across variants, and the previous count is restored afterwards.
    Works for ``nn.Module``, TorchScript modules and any callable. CUDA work is synchronized.

    Args:
        fn_or_model: the model or function to time.
        example_inputs: its inputs (see the module docstring for the calling convention).
        warmup: untimed calls first (allocator, oneDNN primitive caches, lazy init).
        repeats: timed calls; the median is returned.
        threads: ``torch.set_num_threads`` value during the measurement (None keeps the current).

    Raises:
        ConfigError: ``warmup < 0``, ``repeats < 1`` or ``threads < 1``.
    """
    check_int("warmup", warmup, low=0)
    check_int("repeats", repeats, low=1)
    check_int("threads", threads, low=1, allow_none=True)
    tensor = _first_tensor(example_inputs)
    sync = torch.cuda.synchronize if tensor is not None and tensor.is_cuda else (lambda: None)
    times = []
    with _num_threads(threads), _inference(fn_or_model):
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            call_with_inputs(fn_or_model, example_inputs)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def interleaved_times(models: Mapping[str, Callable[..., Any]], example_inputs: Any, repeats: int = 15,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds of every call of each model, the calls interleaved (a, b, a, b, ...).

    For *ratios* between variants on a shared CPU: a neighbour's burst hits every variant alike,
    and contention only ever adds time, so the minimum estimates a model's own cost best (see
    :func:`interleaved_min_ms`). ``warmup`` untimed calls each first; submodule modes are restored.
    """
    check_int("repeats", repeats, low=1)
    check_int("warmup", warmup, low=0)
    times: dict[str, list[float]] = {name: [] for name in models}
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(_inference(model))
        for model in models.values():
            for _ in range(warmup):
                call_with_inputs(model, example_inputs)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                call_with_inputs(model, example_inputs)
                times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def interleaved_min_ms(models: Mapping[str, Callable[..., Any]], example_inputs: Any, repeats: int = 15) -> dict[str, float]:
    """Minimum milliseconds per call of each model over :func:`interleaved_times` (one warm-up call each)."""
    return {name: min(ms) for name, ms in interleaved_times(models, example_inputs, repeats).items()}


def measure_latencies(
    model: Callable[..., Any],
    make_inputs: Callable[[int], Any] | Any,
    batch_sizes: Sequence[int] = (1, 32),
    **kwargs: Any,
) -> dict[int, float]:
    """:func:`measure_latency` per batch size; ``make_inputs(batch)`` builds the inputs.

    ``make_inputs`` may also be an example batch, resized with :func:`resize_batch`.
    """
    build = make_inputs if callable(make_inputs) else (lambda batch: resize_batch(make_inputs, batch))
    return {int(batch): measure_latency(model, build(int(batch)), **kwargs) for batch in batch_sizes}


def peak_memory_mb(model: Callable[..., Any], example_inputs: Any) -> float:
    """Peak memory (MiB) allocated by one forward pass, beyond weights and inputs already held.

    CPU method: one warm-up call, then one call under ``torch.profiler.profile(profile_memory=True)``;
    the profiler records every allocator event (``+bytes`` on allocation, ``-bytes`` on free);
    summing them in time order gives the live bytes at each instant, whose maximum is the peak
    of activations, workspaces and outputs. On CUDA, ``torch.cuda.max_memory_allocated`` minus
    the memory allocated before the call.
    """
    tensor = _first_tensor(example_inputs)
    with _inference(model):
        call_with_inputs(model, example_inputs)
        if tensor is not None and tensor.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(tensor.device)
            before = torch.cuda.memory_allocated(tensor.device)
            call_with_inputs(model, example_inputs)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated(tensor.device) - before) / _MiB
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call_with_inputs(model, example_inputs)
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / _MiB


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB), from ``resource.getrusage``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MiB if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux


def _attempt(key: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:  # a failed measurement must never kill a training run
        log.warning("footprint: %s could not be measured for this model (%s: %s); reporting None", key, type(err).__name__, err)
        return None



def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()`` (``"AVX2"``, ``"AVX512"``, ...): int8/bf16 speed and some int8 numerics depend on it."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # very old builds / non-x86
        return "unknown"


def cpu_flags() -> dict[str, Any]:
    """The CPU facts every figure is recorded with: capability, model name, and the ISA flags that matter."""
    flags: set[str] = set()
    model = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return {"capability": cpu_capability(), "model": model, **{f: f in flags for f in wanted}}

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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, Tensor):
        return _jsonable(value.item() if value.numel() == 1 else value.tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())  # numpy scalars and arrays
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN / inf are not valid JSON
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def write_results(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as JSON atomically: a temp file in the same directory, then ``os.replace``.

    A crash mid-write leaves the previous file intact (never a truncated one). Tensors and numpy
    scalars become numbers, NaN/inf become ``null``, other objects their ``str``.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(payload), indent=2, sort_keys=False, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
