"""What every back end shares: atomic writes, metadata, eval mode, tracing, loading and verification.

Every artifact carries its own metadata (``lightning_eff.json``: format, quantized engine, torch
version, input shapes) so that a model packed for ``qnnpack`` and loaded under ``x86`` is noticed
(:func:`read_metadata` warns). Every write is atomic (temp file in the same directory, then
``os.replace``): a failed export raises a clear error and never deletes or truncates anything.

What works on the pinned build (RELIABILITY.md):

* TorchScript trace/script and ``_save_for_lite_interpreter`` work (with FutureWarnings).
  Tracing records one path through the code, so trace warnings are errors here and
  :func:`verify_artifact` runs on inputs *different* from the export example.
* ``optimize_for_mobile`` needs XNNPACK, which these wheels lack; we check
  ``torch._C._is_xnnpack_enabled()`` first and raise :class:`ExportUnavailableError` pointing to
  ExecuTorch instead of letting torch hit an INTERNAL ASSERT.
* ExecuTorch: ``torch.export`` -> ``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])``
  -> ``to_executorch``. Eager/FX int8 models cannot be exported; int8 ``.pte`` files come from
  the pt2e flow (:mod:`lightning_eff.compression.quantization.pt2e`).

Example:
    >>> from lightning_eff.export import export_torchscript
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    >>> x = torch.randn(2, 1, 8, 8)
    >>> path = export_torchscript(net, (x,), "/tmp/net.pt")
    >>> art = load_artifact(path)
    >>> verify_artifact(net, art, [torch.randn(3, 1, 8, 8)])["max_abs_err"] < 1e-5
    True
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_eff.batch import input_args as _inputs
from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_bool, check_choice

__all__ = ["ExportError", "METADATA_NAME", "load_artifact", "read_metadata", "verify_artifact", "sqnr_from_sums", "perturbed_inputs", "Artifact"]

METADATA_NAME = "lightning_eff.json"


class ExportError(RuntimeError):
    """An export ran but produced something we cannot trust (trace warnings, failed lowering)."""


# --------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success ``os.replace`` it onto ``path``, else delete it.

    The temp file sits in a private temp folder in the same directory and has the final file
    name: TorchScript archives take their root folder name from the file name, and the same
    filesystem makes ``os.replace`` atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield folder / path.name
        os.replace(folder / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _is_quantized(model: Any) -> bool:
    if isinstance(model, nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_quantized:
                return True
        return any("quantized" in type(m).__module__ for m in model.modules())
    return False


def _warn_if_fake_quant(model: Any) -> None:
    """A prepared (fake-quant) model exports as a *float* model with extra ops: usually a mistake."""
    if isinstance(model, nn.Module) and any(hasattr(m, "fake_quant_enabled") for m in model.modules()):
        warnings.warn(
            "exporting a model that still holds fake-quant modules (a prepared QAT model): the artifact computes in "
            "float and is slower than the float model; export convert_fx_model(prepared) for int8.",
            UserWarning,
            stacklevel=3,
        )


def _engine_of(model: Any, engine: str | None) -> str | None:
    from lightning_eff.compression.quantization.engines import check_engine

    if engine is not None:
        return check_engine(engine)
    from lightning_eff.compression.quantization.engines import model_engine

    recorded = model_engine(model)
    if recorded is not None:
        return recorded
    return torch.backends.quantized.engine if _is_quantized(model) else None


def _metadata(fmt: str, inputs: tuple, engine: str | None, **extra: Any) -> dict:
    return {
        "format": fmt,
        "engine": engine,
        "torch_version": torch.__version__,
        "input_shapes": [list(t.shape) if isinstance(t, torch.Tensor) else None for t in inputs],
        "input_dtypes": [str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs],
        "created_by": "lightning_eff",
        **extra,
    }


def _set_mode(model: Any, mode: bool) -> None:
    try:
        model.train(mode)
    except NotImplementedError:  # a torch.export graph without torchao's train/eval override
        from lightning_eff.compression.quantization.pt2e import set_pt2e_training

        set_pt2e_training(model, mode)


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    if not isinstance(model, nn.Module):
        yield
        return
    was = model.training
    _set_mode(model, False)
    try:
        yield
    finally:
        if was:
            _set_mode(model, True)


def _resolve_method(model: Any, method: str) -> str:
    check_choice("method", method, ["auto", "trace", "script"])
    if method != "auto":
        return method
    # An FX GraphModule is already a static graph (FX refused data-dependent control flow), and
    # its int8 ops take scale/zero-point buffers as Python floats, which tracing would report as
    # "Converting a tensor to a Python float" for every op: script it. Everything else: trace.
    return "script" if isinstance(model, torch.fx.GraphModule) else "trace"


_TENSOR_NAMES = ("torch.Tensor", "Tensor")  # string annotations (``from __future__ import annotations``)


def _drop_fx_annotations(model: nn.Module) -> None:
    """Remove type annotations from FX graphs before scripting.

    FX copies the user's ``forward(self, x: torch.Tensor) -> torch.Tensor`` annotations into the
    generated code as mangled globals (``_torch_Tensor_``), which TorchScript cannot resolve
    ("Unknown type name"); without them TorchScript infers ``Tensor``, the same thing. Only plain
    ``Tensor`` annotations are dropped (``Optional[Tensor]`` would change meaning).
    """
    for module in model.modules():
        if isinstance(module, torch.fx.GraphModule):
            changed = False
            for node in module.graph.nodes:
                if node.op in ("placeholder", "output") and (node.type is torch.Tensor or node.type in _TENSOR_NAMES):
                    node.type = None
                    changed = True
            if changed:
                module.recompile()


def _to_script(model: nn.Module, inputs: tuple, method: str) -> torch.jit.ScriptModule:
    """Script or trace with trace warnings turned into errors (a warning means a baked-in branch)."""
    if isinstance(model, torch.jit.ScriptModule):
        return model
    if method == "script":
        _drop_fx_annotations(model)
        try:
            return torch.jit.script(model)
        except Exception as err:
            raise ExportError(f"torch.jit.script failed: {type(err).__name__}: {err}. Try method='trace'.") from err
    # Record instead of filterwarnings("error"): a warning raised inside the C++ tracer surfaces
    # as an opaque SystemError, while a recorded one keeps its message.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(model, inputs, check_trace=True)
        except Exception as err:
            raise ExportError(f"torch.jit.trace failed: {type(err).__name__}: {err}") from err
    tracer_warnings = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    for w in caught:  # pass the others on
        if w not in tracer_warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if tracer_warnings:
        raise ExportError(
            f"tracing is not faithful: {tracer_warnings[0].message}. The traced graph would silently hard-code this "
            "value or branch; make the code trace-friendly, use method='script', or export with ExecuTorch (torch.export)."
        )
    return traced


# ---------------------------------------------------------------------------------- TorchScript


# ------------------------------------------------------------------------------------ ExecuTorch

# ------------------------------------------------------------------------------------------ ONNX

# -------------------------------------------------------------------------------- load / verify
def _read_metadata(path: Path) -> dict:
    from lightning_eff.export.registry import exporter_for_path

    return exporter_for_path(path).read_metadata(path)


def read_metadata(path: str | os.PathLike) -> dict:
    """Read an artifact's ``lightning_eff.json`` metadata (``{}`` if it has none).

    Warns (``UserWarning``) when the recorded quantized engine differs from the current
    ``torch.backends.quantized.engine``: weights are re-packed for the current engine at load
    time and results may differ from what was verified at export.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no artifact at {path}")
    meta = _read_metadata(path)
    engine = meta.get("engine")
    if engine and meta.get("format") != "executorch" and engine != torch.backends.quantized.engine:
        warnings.warn(
            f"{path.name} was exported for quantized engine {engine!r} but the current engine is "
            f"{torch.backends.quantized.engine!r}; set torch.backends.quantized.engine = {engine!r} "
            "(load_artifact does this for you) or re-export for this engine.",
            UserWarning,
            stacklevel=2,
        )
    return meta


class Artifact:
    """A loaded artifact as a callable: ``artifact(*inputs) -> output`` (first output for .pte).

    Attributes:
        path: the file. kind: ``"torchscript" | "lite" | "executorch" | "onnx"``.
        metadata: its ``lightning_eff.json``. module: the loaded object.
    """

    def __init__(self, path: Path, kind: str, module: Any, metadata: dict, engine: str | None):
        self.path, self.kind, self.module, self.metadata, self.engine = path, kind, module, metadata, engine

    def __call__(self, *inputs: Any) -> Any:
        from lightning_eff.compression.quantization.engines import quantized_engine

        if self.kind == "executorch":
            out = self.module.execute(list(inputs))
            return out[0] if len(out) == 1 else tuple(out)
        if self.kind == "onnx":
            feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(self.module.get_inputs(), inputs)}
            out = [torch.from_numpy(o) for o in self.module.run(None, feeds)]
            return out[0] if len(out) == 1 else tuple(out)
        with quantized_engine(self.engine), torch.no_grad():
            return self.module(*inputs)

    def __repr__(self) -> str:
        return f"Artifact(kind={self.kind!r}, path='{self.path}', engine={self.engine!r})"


def load_artifact(path: str | os.PathLike, *, use_recorded_engine: bool = True) -> Artifact:
    """Load ``.pt`` / ``.ptl`` / ``.pte`` / ``.onnx`` and return a callable :class:`Artifact`.

    Args:
        path: the file; the format is taken from the suffix.
        use_recorded_engine: load and run under the quantized engine recorded at export (so
            the numbers match what was verified); ``False`` uses the current engine and warns
            on a mismatch.

    Raises:
        FileNotFoundError: no such file. ConfigError: unknown suffix.
        ExportUnavailableError: the runtime for the format is missing (executorch, onnxruntime).
    """
    from lightning_eff.compression.quantization.engines import supported_engines
    from lightning_eff.export.registry import exporter_for_path, formats

    check_bool("use_recorded_engine", use_recorded_engine)
    path = Path(path)
    check_choice("artifact suffix", path.suffix.lower(), [f".{f}" for f in formats()])
    exporter = exporter_for_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no artifact at {path}")
    meta = _read_metadata(path) if use_recorded_engine else read_metadata(path)
    engine = meta.get("engine") if use_recorded_engine and meta.get("engine") in supported_engines() else None
    engine = engine if exporter.kind in ("torchscript", "lite") else None
    return Artifact(path, exporter.kind, exporter.load(path, engine), meta, engine)


def perturbed_inputs(example_inputs: Any, n: int = 2, *, scale: float = 0.5, seed: int = 0) -> list[tuple]:
    """``n`` input tuples that differ from the example: ``x + scale * std(x) * noise`` per tensor.

    Traced graphs bake in shape- and value-dependent branches; checking the artifact only on
    its export example would not reveal that (RELIABILITY.md item 13).
    """
    inputs = _inputs(example_inputs)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = []
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen).to(t.dtype)
                batch.append(t + scale * (t.std() if t.numel() > 1 else 1.0) * noise)
            else:
                batch.append(t)
        out.append(tuple(batch))
    return out


def sqnr_from_sums(signal: float, noise: float) -> float:
    """Signal-to-quantization-noise ratio in dB from summed squares (``inf`` without noise, ``-inf`` without signal)."""
    if noise <= 0.0:
        return float("inf")
    if signal <= 0.0 or not math.isfinite(noise):
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


@torch.no_grad()
def verify_artifact(
    reference_model: Any,
    artifact_callable: Any,
    inputs: Any,
    *,
    example_inputs: Any = None,
) -> dict:
    """Compare an exported artifact with its reference model on *new* inputs.

    Args:
        reference_model: the eager model (float or int8) the artifact was made from.
        artifact_callable: e.g. :func:`load_artifact`'s result.
        inputs: a list of batches (tensor or tuple each), or one tensor.
        example_inputs: the export example; a batch equal to it raises ``ConfigError``.

    Returns:
        ``{"top1_agreement", "max_abs_err", "mean_abs_err", "sqnr_db", "batches", "samples"}``;
        ``top1_agreement`` is the share of rows whose argmax over the last dim agrees; ``sqnr_db`` is
        ``10·log10(Σref² / Σ(ref−got)²)`` over all outputs (``inf`` when identical): top-1 on a few
        images can agree while the outputs are far off, the relative error cannot.
    """
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not batches:
        raise ConfigError("verify_artifact: inputs is empty.")
    example = _inputs(example_inputs) if example_inputs is not None else None
    agree = total = 0
    max_err, abs_sum, count = 0.0, 0.0, 0
    signal = noise = 0.0
    with _eval_mode(reference_model):
        for batch in batches:
            args = _inputs(batch)
            if example is not None and all(
                isinstance(a, torch.Tensor) and isinstance(e, torch.Tensor) and a.shape == e.shape and torch.equal(a, e)
                for a, e in zip(args, example)
            ):
                raise ConfigError("verify_artifact: verification inputs must differ from the export example.")
            ref = reference_model(*args)
            got = artifact_callable(*args)
            ref = ref.dequantize() if ref.is_quantized else ref
            got = got.dequantize() if got.is_quantized else got
            if ref.shape != got.shape:
                raise ExportError(f"artifact output shape {tuple(got.shape)} differs from reference {tuple(ref.shape)}.")
            diff = (ref.float() - got.float()).abs()
            signal += float(ref.double().pow(2).sum())
            noise += float(diff.double().pow(2).sum())
            max_err = max(max_err, float(diff.max()) if diff.numel() else 0.0)
            abs_sum += float(diff.sum())
            count += diff.numel()
            if ref.dim() >= 1 and ref.shape[-1] > 1:
                flat_ref = ref.reshape(-1, ref.shape[-1]).argmax(-1)
                flat_got = got.reshape(-1, got.shape[-1]).argmax(-1)
                agree += int((flat_ref == flat_got).sum())
                total += flat_ref.numel()
    return {
        "top1_agreement": agree / total if total else float("nan"),
        "max_abs_err": max_err,
        "mean_abs_err": abs_sum / max(count, 1),
        "sqnr_db": sqnr_from_sums(signal, noise),
        "batches": len(batches),
        "samples": total,
    }
