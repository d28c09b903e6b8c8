"""TorchScript back end (``.pt``): traced or scripted, engine recorded in the archive."""
from __future__ import annotations

import copy
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_eff.errors import ConfigError
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
from lightning_eff.validation import check_bool


def export_torchscript(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    method: str = "auto",
    engine: str | None = None,
    freeze: bool = False,
    channels_last: bool = False,
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
        freeze: ``torch.jit.freeze`` the module (weights become constants, BatchNorm is folded into the
            preceding convolution, conv+add+ReLU fused by the optimizer): faster on CPU, loads back with
            ``torch.jit.load``; only ``forward`` is kept and the weights can no longer be trained.
        channels_last: float models only: store 4-D weights NHWC and convert 4-D inputs inside the graph
            (:class:`~lightning_eff.training.layout.ChannelsLastInput`); callers still pass NCHW tensors.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ConfigError: bad option. ExportError: tracing/scripting failed or was unfaithful.
    """
    check_bool("freeze", freeze)
    check_bool("channels_last", channels_last)
    if channels_last and _is_quantized(model):
        raise ConfigError("channels_last=True applies to float models (int8 kernels choose their own layout).")
    if channels_last:
        from lightning_eff.training.layout import ChannelsLastInput

        model = ChannelsLastInput(copy.deepcopy(model))
    method = _resolve_method(model, method)
    inputs = _inputs(example_inputs)
    engine = _engine_of(model, engine)
    _warn_if_fake_quant(model)
    from lightning_eff.compression.quantization.engines import quantized_engine

    meta = _metadata("torchscript", inputs, engine, method=method, quantized=_is_quantized(model))
    meta.update(frozen=freeze, channels_last=channels_last)
    with _eval_mode(model), quantized_engine(engine):
        scripted = _to_script(model, inputs, method)
        if freeze:
            scripted = torch.jit.freeze(scripted.eval())
        with _atomic_target(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={METADATA_NAME: json.dumps(meta)})
    return Path(path)



def read_archive_metadata(path: Path) -> dict:
    """The ``lightning_eff.json`` stored in a TorchScript / lite archive's ``extra/`` folder (``{}`` if none)."""
    with zipfile.ZipFile(path) as zf:
        name = next((n for n in zf.namelist() if n.endswith(f"/extra/{METADATA_NAME}")), None)
        return json.loads(zf.read(name)) if name else {}


def _load(path: Path, engine: str | None) -> Any:
    from lightning_eff.compression.quantization.engines import quantized_engine

    with quantized_engine(engine):
        return torch.jit.load(str(path)).eval()


def _skip(model: Any, int8: bool, pt2e: bool) -> str | None:
    return "a pt2e int8 graph runs on ExecuTorch (.pte), not TorchScript" if pt2e else None


def _engine(model: Any) -> str | None:
    from lightning_eff.compression.quantization.engines import model_engine

    return model_engine(model) if isinstance(model, nn.Module) else None


register_exporter(Exporter("pt", "torchscript", export_torchscript, _load, read_archive_metadata, _skip, _engine,
                           frozenset({"method", "engine", "freeze", "channels_last"}), order=10))
