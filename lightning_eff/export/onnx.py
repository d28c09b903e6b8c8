"""ONNX back end (``.onnx``, the dynamo exporter): float models only."""
from __future__ import annotations

import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_eff.errors import ExportUnavailableError
from lightning_eff.export.core import (
    METADATA_NAME,
    ExportError,
    _atomic_target,
    _eval_mode,
    _inputs,
    _is_quantized,
    _metadata,
)
from lightning_eff.export.registry import Exporter, register_exporter


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



def read_onnx_metadata(path: Path) -> dict:
    """The metadata stored in an ONNX model's ``metadata_props``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return json.loads(props[METADATA_NAME]) if METADATA_NAME in props else {}


def _load(path: Path, engine: str | None) -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise ExportUnavailableError(
            f"running .onnx needs onnxruntime ({err}); pip install onnxruntime, or check the file with onnx.checker."
        ) from err
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _skip(model: Any, int8: bool, pt2e: bool) -> str | None:
    return "int8 models are not exported to ONNX (export the float model and quantize in the ONNX toolchain)" if (int8 or pt2e) else None


register_exporter(Exporter("onnx", "onnx", export_onnx, _load, read_onnx_metadata, _skip, options=frozenset({"opset"}), order=40))
