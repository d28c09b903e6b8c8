"""Export to TorchScript (``.pt``), the lite interpreter (``.ptl``), ExecuTorch (``.pte``) and ONNX.

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
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU()).eval()
    >>> x = torch.randn(2, 1, 8, 8)
    >>> path = export_torchscript(net, (x,), "/tmp/net.pt")
    >>> art = load_artifact(path)
    >>> verify_artifact(net, art, [torch.randn(3, 1, 8, 8)])["max_abs_err"] < 1e-5
    True
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_eff.errors import ConfigError, ExportUnavailableError
from lightning_eff.validation import check_bool, check_choice

__all__ = [
    "ExportError",
    "METADATA_NAME",
    "export_torchscript",
    "export_lite",
    "export_executorch",
    "export_onnx",
    "mobile_optimizer_available",
    "load_artifact",
    "read_metadata",
    "verify_artifact",
    "sqnr_from_sums",
    "perturbed_inputs",
    "Artifact",
]

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


def _inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tensor or a non-empty tuple, got {type(example_inputs).__name__}.")


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
    from lightning_eff.compression.quantization.preflight import check_engine

    if engine is not None:
        return check_engine(engine)
    from lightning_eff.compression.quantization.fx import model_engine

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
def export_torchscript(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    method: str = "auto",
    engine: str | None = None,
) -> Path:
    """Save ``model`` as TorchScript (``torch.jit.save``) with engine metadata; atomic.

    Args:
        model: float or int8 (FX-converted) model; exported in eval mode, mode restored after.
        example_inputs: tensor or tuple used to trace (and recorded in metadata).
        path: target file (``.pt``).
        method: ``"trace"`` (trace warnings are errors, ``check_trace`` re-runs and
            compares), ``"script"``, or ``"auto"`` (default: script FX ``GraphModule`` s, i.e.
            models from ``convert_fx_model``, whose int8 ops would raise spurious trace
            warnings about their constant scales; trace everything else).
        engine: quantized engine to record; default the one stored on the model by
            ``convert_fx_model``, or the current engine for other quantized models.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ConfigError: bad option. ExportError: tracing/scripting failed or was unfaithful.
    """
    method = _resolve_method(model, method)
    inputs = _inputs(example_inputs)
    engine = _engine_of(model, engine)
    _warn_if_fake_quant(model)
    from lightning_eff.compression.quantization.preflight import quantized_engine

    meta = _metadata("torchscript", inputs, engine, method=method, quantized=_is_quantized(model))
    with _eval_mode(model), quantized_engine(engine):
        scripted = _to_script(model, inputs, method)
        with _atomic_target(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={METADATA_NAME: json.dumps(meta)})
    return Path(path)


def mobile_optimizer_available() -> bool:
    """True when this torch build has XNNPACK, which ``optimize_for_mobile`` needs."""
    return bool(torch._C._is_xnnpack_enabled())


def export_lite(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    engine: str | None = None,
    method: str = "auto",
    optimize: bool = False,
) -> Path:
    """Save for PyTorch Mobile's lite interpreter (``.ptl``) with engine metadata; atomic.

    Args:
        model, example_inputs, engine, method: as in :func:`export_torchscript`.
        path: target file (``.ptl``).
        optimize: run ``optimize_for_mobile`` first (needs XNNPACK in the torch build).

    Raises:
        ExportUnavailableError: ``optimize=True`` on a build without XNNPACK (checked before
            anything is written); use :func:`export_executorch` instead.
        ExportError: tracing failed.
    """
    check_bool("optimize", optimize)
    method = _resolve_method(model, method)
    if optimize and not mobile_optimizer_available():
        raise ExportUnavailableError(
            "optimize_for_mobile needs XNNPACK, and this torch build has it disabled "
            "(torch._C._is_xnnpack_enabled() is False; torch would fail with an INTERNAL ASSERT). "
            "Export without optimize=True, or use ExecuTorch (export_executorch -> .pte with the XNNPACK backend)."
        )
    inputs = _inputs(example_inputs)
    engine = _engine_of(model, engine)
    _warn_if_fake_quant(model)
    from lightning_eff.compression.quantization.preflight import quantized_engine

    meta = _metadata("lite", inputs, engine, method=method, quantized=_is_quantized(model), optimized=optimize)
    with _eval_mode(model), quantized_engine(engine):
        scripted = _to_script(model, inputs, method)
        if optimize:
            from torch.utils.mobile_optimizer import optimize_for_mobile

            scripted = optimize_for_mobile(scripted)
        with _atomic_target(path) as tmp:
            scripted._save_for_lite_interpreter(str(tmp), _extra_files={METADATA_NAME: json.dumps(meta)})
    return Path(path)


# ------------------------------------------------------------------------------------ ExecuTorch
def _write_sidecar(path: Path, meta: dict) -> None:
    with _atomic_target(Path(f"{path}.json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))


def export_executorch(
    model_or_exported: Any,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    int8: bool = False,
    per_channel: bool = True,
    calibration: Sequence[Any] | None = None,
) -> Path:
    """Lower to an ExecuTorch program with the XNNPACK backend and write the ``.pte``; atomic.

    Args:
        model_or_exported: a float ``nn.Module``, a pt2e-converted ``GraphModule`` or a
            ``torch.export.ExportedProgram``.
        example_inputs: tensor or tuple; the ``.pte`` has these static shapes.
        path: target file (``.pte``); metadata goes to ``<path>.json``.
        int8: quantize a float module first with pt2e static PTQ (XNNPACK symmetric int8),
            calibrated on ``calibration`` batches (default: the example inputs). Models already
            converted by ``convert_pt2e_model`` are exported as they are.
        per_channel: per-channel weights for ``int8=True``.
        calibration: batches (tensors or tuples) for ``int8=True``.

    Raises:
        ExportUnavailableError: executorch not installed.
        ExportError: ``torch.export`` or lowering failed (e.g. an FX/eager int8 model, which
            torch.export cannot capture: use the pt2e flow).
    """
    check_bool("int8", int8)
    inputs = _inputs(example_inputs)
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as err:
        raise ExportUnavailableError(
            f"ExecuTorch is not installed ({err}); pip install 'lightning_eff[export]' (executorch==1.5.1), "
            "or export TorchScript / lite (.pt / .ptl) instead."
        ) from err
    from lightning_eff.compression.quantization import pt2e

    target = model_or_exported
    quantized = isinstance(target, nn.Module) and pt2e.is_pt2e_quantized(target)
    if int8 and isinstance(target, nn.Module) and not quantized:
        if _is_quantized(target):
            raise ExportError(
                "this model was quantized with torch.ao (eager/FX), which torch.export cannot capture; "
                "quantize with prepare_pt2e_model/convert_pt2e_model or pass the float model with int8=True."
            )
        prepared = pt2e.prepare_pt2e_model(target, inputs, qat=False, per_channel=per_channel)
        with torch.no_grad():
            for batch in calibration or [inputs]:
                prepared(*_inputs(batch))
        target = pt2e.convert_pt2e_model(prepared, inplace=True)
        quantized = True
    try:
        if isinstance(target, torch.export.ExportedProgram):
            program = target
        else:
            with _eval_mode(target), torch.no_grad():
                program = torch.export.export(target, inputs)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as err:
        raise ExportError(f"ExecuTorch export failed: {type(err).__name__}: {err}") from err
    path = Path(path)
    with _atomic_target(path) as tmp:
        tmp.write_bytes(lowered.buffer)
    _write_sidecar(path, _metadata("executorch", inputs, "xnnpack", quantized=bool(quantized or int8)))
    return path


# ------------------------------------------------------------------------------------------ ONNX
def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int | None = None) -> Path:
    """Export a float model to ONNX with ``torch.onnx.export`` (dynamo exporter); atomic.

    torch.ao int8 models are not supported by the exporter; export the float model and quantize
    in the ONNX toolchain. Metadata goes into the model's ``metadata_props``.

    Raises:
        ExportUnavailableError: ``onnx``/``onnxscript`` not installed.
        ExportError: the exporter failed.
    """
    try:
        import onnx

        importlib.import_module("onnxscript")  # the dynamo exporter needs it
    except ImportError as err:
        raise ExportUnavailableError(f"ONNX export needs onnx and onnxscript ({err}); pip install onnx onnxscript.") from err
    inputs = _inputs(example_inputs)
    if _is_quantized(model):
        raise ExportError("torch.ao int8 models cannot be exported to ONNX here; export the float model instead.")
    meta = _metadata("onnx", inputs, None, opset=opset)
    with _eval_mode(model), _atomic_target(path) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(model, inputs, dynamo=True, opset_version=opset, external_data=False)
        except Exception as err:
            raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err
        proto = program.model_proto
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_NAME, json.dumps(meta)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return Path(path)


# -------------------------------------------------------------------------------- load / verify
def _read_metadata(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".pte":
        side = Path(f"{path}.json")
        return json.loads(side.read_text()) if side.exists() else {}
    if suffix == ".onnx":
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in proto.metadata_props}
        return json.loads(props[METADATA_NAME]) if METADATA_NAME in props else {}
    with zipfile.ZipFile(path) as zf:
        name = next((n for n in zf.namelist() if n.endswith(f"/extra/{METADATA_NAME}")), None)
        return json.loads(zf.read(name)) if name else {}


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
        from lightning_eff.compression.quantization.preflight import quantized_engine

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
    from lightning_eff.compression.quantization.preflight import quantized_engine, supported_engines

    check_bool("use_recorded_engine", use_recorded_engine)
    path = Path(path)
    suffix = path.suffix.lower()
    check_choice("artifact suffix", suffix, [".pt", ".ptl", ".pte", ".onnx"])
    if not path.exists():
        raise FileNotFoundError(f"no artifact at {path}")
    if use_recorded_engine:
        meta = _read_metadata(path)
    else:
        meta = read_metadata(path)
    engine = meta.get("engine") if use_recorded_engine and meta.get("engine") in supported_engines() else None
    if suffix == ".pte":
        try:
            from executorch.runtime import Runtime
        except ImportError as err:
            raise ExportUnavailableError(f"loading .pte needs executorch ({err}); pip install executorch==1.5.1.") from err
        method = Runtime.get().load_program(path).load_method("forward")
        return Artifact(path, "executorch", method, meta, None)
    if suffix == ".onnx":
        try:
            import onnxruntime
        except ImportError as err:
            raise ExportUnavailableError(
                f"running .onnx needs onnxruntime ({err}); pip install onnxruntime, or check the file with onnx.checker."
            ) from err
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return Artifact(path, "onnx", session, meta, None)
    with quantized_engine(engine):
        if suffix == ".ptl":
            from torch.jit.mobile import _load_for_lite_interpreter

            return Artifact(path, "lite", _load_for_lite_interpreter(str(path)), meta, engine)
        return Artifact(path, "torchscript", torch.jit.load(str(path)).eval(), meta, engine)


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
