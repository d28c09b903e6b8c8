"""PyTorch Mobile lite-interpreter back end (``.ptl``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_eff.errors import ExportUnavailableError
from lightning_eff.export import torchscript
from lightning_eff.export.core import (
    METADATA_NAME,
    _atomic_target,
    _engine_of,
    _eval_mode,
    _inputs,
    _is_quantized,
    _metadata,
    _resolve_method,
    _to_script,
    _warn_if_fake_quant,
)
from lightning_eff.export.registry import Exporter, register_exporter
from lightning_eff.export.torchscript import read_archive_metadata
from lightning_eff.validation import check_bool


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
    from lightning_eff.compression.quantization.engines import quantized_engine

    meta = _metadata("lite", inputs, engine, method=method, quantized=_is_quantized(model), optimized=optimize)
    with _eval_mode(model), quantized_engine(engine):
        scripted = _to_script(model, inputs, method)
        if optimize:
            from torch.utils.mobile_optimizer import optimize_for_mobile

            scripted = optimize_for_mobile(scripted)
        with _atomic_target(path) as tmp:
            scripted._save_for_lite_interpreter(str(tmp), _extra_files={METADATA_NAME: json.dumps(meta)})
    return Path(path)



def _load(path: Path, engine: str | None) -> Any:
    from torch.jit.mobile import _load_for_lite_interpreter

    from lightning_eff.compression.quantization.engines import quantized_engine

    with quantized_engine(engine):
        return _load_for_lite_interpreter(str(path))


register_exporter(Exporter("ptl", "lite", export_lite, _load, read_archive_metadata, torchscript._skip, torchscript._engine,
                           frozenset({"method", "engine", "optimize"}), order=20))
