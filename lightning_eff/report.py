"""End-of-run report: one footprint row per model variant (fp32, PTQ int8, QAT int8, ...).

The survey's argument is the pareto frontier of quality versus footprint, so every run ends
with the same measurements for every variant it produced, taken the same way: test accuracy
(a plain CPU loop over the test loader, identical for float and int8 models), parameters,
non-zero parameters, serialized bytes, MACs, CPU latency and peak memory, plus the bytes and
verification figures of each exported artifact.

Callbacks take part through two optional methods:

* ``deployable_models() -> dict[str, nn.Module]`` — e.g. ``{"qat_int8": converted}``;
* ``artifacts() -> list[dict]`` — one entry per exported file (``variant``, ``format``, ``path``,
  ``bytes``, ...).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_eff.batch import call_model, resize_batch, split_batch
from lightning_eff.compression.pruning.speed import (
    sparsity_latency,
    weight_zero_fraction,
)
from lightning_eff.compression.quantization.engines import (
    model_engine,
    quantized_engine,
)
from lightning_eff.compression.quantization.fx import is_fake_quant, is_pt2e_int8
from lightning_eff.errors import ConfigError
from lightning_eff.measure import (
    cpu_capability,
    cpu_flags,
    measure_footprint,
    measure_latency,
)
from lightning_eff.protocols import offered_models
from lightning_eff.validation import check_bool, check_number

__all__ = ["build_report", "evaluate_accuracy", "collect_deployables", "describe_model", "int8_speed"]

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module | Any, dataloader: Any, max_batches: int | None = None) -> float:
    """Top-1 accuracy of ``model`` over ``dataloader`` on CPU (works for float, int8 and scripted models)."""
    if isinstance(model, nn.Module):
        model.eval()
    correct = total = 0
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        inputs, labels = split_batch(batch)
        logits = call_model(model, inputs)
        correct += int((logits.argmax(dim=-1) == labels).sum())
        total += int(labels.numel())
    return correct / max(total, 1)


def describe_model(model: Any) -> str:
    """Which model a footprint row measures, in words (a fake-quant training graph is not a deployable model)."""
    if isinstance(model, torch.jit.ScriptModule):
        return "TorchScript module"
    if not isinstance(model, nn.Module):
        return type(model).__name__
    modules = list(model.modules())
    if is_fake_quant(model):
        return "QAT fake-quant training graph (not deployable; the qat_int8_* rows are its int8 models)"
    if is_pt2e_int8(model):
        return "int8 pt2e graph for XNNPACK/ExecuTorch, run here by eager PyTorch (its .pte artifact is the deployable form)"
    engine = model_engine(model)
    if engine is not None and any("quantized" in type(m).__module__ for m in modules):
        return f"int8 model (torch.ao, {engine} kernels)"
    if any("quantized" in type(m).__module__ for m in modules):
        return "int8 model (torch.ao)"
    return "float network (eager PyTorch)"


def is_int8_description(text: str) -> bool:
    return text.startswith("int8 model")


def int8_speed(rows: Mapping[str, Mapping[str, Any]], artifacts: Sequence[Mapping[str, Any]], float_row: str = "fp32") -> list[str]:
    """Plain sentences: every int8 row slower than its float source at some batch size, and the fastest artifact.

    Adds ``int8_vs_float_b<N>`` (latency ratio) and ``slower_than_float`` to each int8 row in place.
    """
    sentences: list[str] = []
    base = rows.get(float_row) or {}
    if not str(base.get("model", "")).startswith("float network"):
        base = {}  # e.g. a one-stage QAT run, whose trained row is the fake-quant graph: no float source to compare
    cpu = cpu_capability()
    for name, row in rows.items():
        if not is_int8_description(str(row.get("model", ""))):
            continue
        slower = []
        for key, value in list(row.items()):
            if not key.startswith("latency_ms_b") or value is None or not base.get(key):
                continue
            ratio = value / base[key]
            row[f"int8_vs_float_b{key[len('latency_ms_b'):]}"] = ratio
            if ratio >= 1.0:
                slower.append(f"batch {key[len('latency_ms_b'):]}: {value:.3g} ms vs {base[key]:.3g} ms ({ratio:.2f}x)")
        row["slower_than_float"] = bool(slower)
        if slower:
            sentences.append(f"{name} is SLOWER than its float source {float_row} on this CPU ({cpu}) — " + "; ".join(slower))
    timed = [a for a in artifacts if a.get("latency_ms_b1") is not None and a.get("verified", True) and "error" not in a]
    if timed:
        best = min(timed, key=lambda a: a["latency_ms_b1"])
        sentences.append(f"fastest verified artifact on this CPU ({cpu}) at batch 1: {best['variant']}.{best['format']} "
                         f"({best['latency_ms_b1']:.3g} ms)")
    return sentences


def collect_deployables(callbacks: Sequence[Any]) -> dict[str, nn.Module]:
    """Merge ``deployable_models()`` of every :class:`~lightning_eff.protocols.Deployable` callback (later ones win on name clashes)."""
    return offered_models(callbacks)


def build_report(
    task: Any,
    datamodule: Any,
    callbacks: Sequence[Any],
    options: Mapping[str, Any],
    *,
    fp32_model: nn.Module | None = None,
    fast: bool = False,
    measured_acc: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Measure every variant of the trained model; never raises for a single failed measurement.

    Args:
        task: the trained LightningModule (its ``.model`` is the float/trained network).
        datamodule: gives the test loader and ``sample_inputs(1)``.
        callbacks: all callbacks of all stages (searched for deployables and artifacts).
        options: ``report`` config (``batch_sizes``, ``latency``, ``memory``, ``repeats``, ``eval_batches``).
        fp32_model: float model saved before a fine-tuning stage (else ``task.model`` is the fp32 row).
        fast: ``fast_dev_run`` — two eval batches, one latency repeat.
        measured_acc: ``{variant: top-1 accuracy}`` already measured on the whole test loader (``trainer.test``
            of the trained model): those rows take it (``test_acc_from: "trainer.test"``) instead of a second pass
            over the test set; ignored with ``eval_batches`` or ``fast``, which evaluate a slice.

    Returns:
        ``{"rows": {variant: {metric: value, "model": what it measures}}, "artifacts": [...], "sparsity": [sentence, ...],
        "int8_speed": [sentence, ...], "cpu": {...}}`` — ``int8_speed`` says plainly which int8 rows are slower than
        the float model on this CPU and which artifact is fastest; ``sparsity`` has one
        sentence per sparse variant (zero weights >= ``report.sparsity_probe_min``, default 0.2) saying
        whether, on that variant's backend, the zeros bought latency (``report.sparsity_probe: false`` skips it).
    """
    probe = check_bool("report.sparsity_probe", options.get("sparsity_probe", True))
    probe_min = float(check_number("report.sparsity_probe_min", options.get("sparsity_probe_min", 0.2), low=0.0, high=1.0))
    batch_sizes = tuple(options.get("batch_sizes", (1, 32)))
    repeats = 1 if fast else int(options.get("repeats", 10))
    eval_batches = 2 if fast else options.get("eval_batches")
    known = dict(measured_acc or {}) if eval_batches is None else {}
    variants: dict[str, nn.Module] = {"fp32": fp32_model if fp32_model is not None else _cpu_copy(task.model)}
    if fp32_model is not None:
        variants["trained"] = _cpu_copy(task.model)
    variants.update(collect_deployables(callbacks))

    datamodule.setup("test")
    test_loader = datamodule.test_dataloader()
    example = datamodule.sample_inputs(1)
    rows: dict[str, dict[str, Any]] = {}
    sparsity_verdicts: list[str] = []
    for name, model in variants.items():
        row: dict[str, Any] = {"model": describe_model(model)}
        with quantized_engine(model_engine(model)):  # int8 variants run under the engine they were packed for
            try:
                if name in known:
                    row["test_acc"], row["test_acc_from"] = float(known[name]), "trainer.test"
                else:
                    row["test_acc"] = evaluate_accuracy(model, test_loader, eval_batches)
            except Exception as err:  # a broken variant must not cost the others their row
                log.warning("accuracy of %s failed: %s", name, err)
                row["test_acc"] = None
            row.update(
                measure_footprint(
                    model, example, batch_sizes=batch_sizes, latency=bool(options.get("latency", True)),
                    memory=bool(options.get("memory", True)), warmup=1 if fast else 3, repeats=repeats,
                )
            )
            if options.get("latency", True) and not is_int8_description(row["model"]):
                row.update(_layout_latencies(name, model, example, batch_sizes, options, warmup=1 if fast else 3, repeats=repeats))
            if options.get("latency", True) and probe:
                verdict = _sparsity_verdict(name, model, example, repeats, probe_min)
                if verdict is not None:
                    row.update(verdict[0])
                    sparsity_verdicts.append(verdict[1])
        rows[name] = row
    artifacts: list[dict[str, Any]] = []
    for cb in callbacks:
        fn = getattr(cb, "artifacts", None)
        if callable(fn):
            artifacts.extend(fn())
    speed = int8_speed(rows, artifacts)
    return {"rows": rows, "artifacts": artifacts, "sparsity": sparsity_verdicts, "int8_speed": speed, "cpu": cpu_flags()}


def _layout_latencies(name: str, model: nn.Module, example: Any, batch_sizes: Sequence[int], options: Mapping[str, Any],
                      warmup: int, repeats: int) -> dict[str, Any]:
    """``report.compile`` / ``report.channels_last``: the float variant's latency compiled / NHWC.

    ``report.compile``: ``true`` (inductor) or a backend name; ``report.channels_last``: ``true``.

    Measured on copies beside the eager row (``latency_ms_b<N>_compiled``, ``latency_ms_b<N>_channels_last``),
    so the report shows what each switch buys on this CPU. Compiling takes tens of seconds per variant on a
    CPU (the first call); a failure is logged and leaves the cell empty.
    """
    from lightning_eff.training.layout import ChannelsLastInput, compile_network

    backend = options.get("compile", False)
    if backend is True:
        backend = "inductor"
    elif backend is not False and not isinstance(backend, str):
        raise ConfigError(f"report.compile={backend!r} must be true, false or a torch.compile backend name.")
    wanted = {"compiled": bool(backend), "channels_last": check_bool("report.channels_last", options.get("channels_last", False))}
    out: dict[str, Any] = {}
    for kind, on in wanted.items():
        if not on or not isinstance(model, nn.Module):
            continue
        try:
            variant = copy.deepcopy(model).eval()
            variant = compile_network(variant, backend=backend) if kind == "compiled" else ChannelsLastInput(variant)
            for batch in map(int, batch_sizes):
                out[f"latency_ms_b{batch}_{kind}"] = measure_latency(variant, resize_batch(example, batch),
                                                                     warmup=max(warmup, 2), repeats=repeats)
        except Exception as err:  # one switch failing on one variant never costs the report
            log.warning("report.%s latency of %s failed: %s", "compile" if kind == "compiled" else kind, name, err)
    return out


def _sparsity_verdict(name: str, model: Any, example: Any, repeats: int, min_zeros: float) -> tuple[dict[str, Any], str] | None:
    """Per variant (i.e. per backend): did its zero weights buy latency? ``None`` for dense variants.

    The variant is timed against the same model with its zeros filled in (same kernels, see
    :mod:`lightning_eff.compression.pruning.speed`); the answer is stated plainly either way.
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.jit.ScriptModule):
        return None
    try:
        zeros = weight_zero_fraction(model)
        if zeros < min_zeros:
            return None
        probe = sparsity_latency(model, example, repeats=max(repeats, 5))
    except Exception as err:  # a probe must not cost the run its report
        log.warning("sparsity latency probe of %s failed: %s", name, err)
        return None
    answer = "bought latency" if probe["bought_latency"] else "bought NO latency"
    sentence = (f"{name} ({probe['backend']}): {100 * zeros:.0f}% zero weights {answer} — {probe['sparse_ms']:.3g} ms vs "
                f"{probe['dense_ms']:.3g} ms for the same model with the zeros filled in (batch 1, {probe['speedup']:.2f}x)"
                + ("" if probe["bought_latency"] else "; the kernels are dense: the gain is storage only"))
    row = {"weight_zero_fraction": zeros, "sparsity_speedup": probe["speedup"], "sparsity_bought_latency": probe["bought_latency"]}
    return row, sentence


def _cpu_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().eval()
