"""ExecuTorch back end (``.pte``, XNNPACK delegate): float programs and pt2e int8 programs.

The maintained mobile path. ``int8=True`` on a float module quantizes it here with pt2e static PTQ
(XNNPACK symmetric config), so a caller never runs its own PTQ.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_eff.batch import batch_len, batch_rows
from lightning_eff.errors import ExportUnavailableError
from lightning_eff.export.core import (
    ExportError,
    _atomic_target,
    _eval_mode,
    _inputs,
    _is_quantized,
    _metadata,
)
from lightning_eff.export.registry import Exporter, register_exporter
from lightning_eff.validation import check_bool

log = logging.getLogger(__name__)


def _write_sidecar(path: Path, meta: dict) -> None:
    with _atomic_target(Path(f"{path}.json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))


def _prepare_for_calibration(model: nn.Module, inputs: tuple, calibration: Sequence[Any] | None,
                             per_channel: bool) -> tuple[torch.fx.GraphModule, bool]:
    """pt2e PTQ observers on ``model``, captured with a dynamic batch when the graph allows it.

    Calibration then runs whole batches (one call per batch instead of one per example: 100x fewer calls
    for batches of 128); the converted graph is exported again with the example's static shapes for
    lowering. A model whose graph fixes the batch size is captured at the example's shape and calibrated
    row by row. Returns the prepared graph and whether it takes whole batches.
    """
    from lightning_eff.compression.quantization import pt2e

    first = _inputs(calibration[0]) if calibration else None
    tensors = all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in inputs)
    if first is not None and tensors and batch_len(first) >= 2:
        two = batch_rows(first, 0, 2)  # a batch of 2 to capture with: torch.export specializes a size-1 dim
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        try:
            prepared = pt2e.prepare_pt2e_model(model, two, qat=False, per_channel=per_channel,
                                               dynamic_shapes=tuple({0: batch} for _ in two))
            return prepared, True
        except Exception as err:  # noqa: BLE001 - e.g. a reshape that bakes the batch size in
            log.info("ExecuTorch int8: no dynamic-batch capture (%s: %s); calibrating one example at a time",
                     type(err).__name__, str(err).splitlines()[0][:200])
    return pt2e.prepare_pt2e_model(model, inputs, qat=False, per_channel=per_channel), False


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
        calibration: batches (tensors or tuples, any batch size) for ``int8=True``.

    Raises:
        ExportUnavailableError: executorch not installed.
        ExportError: ``torch.export`` or lowering failed (e.g. an FX/eager int8 model, which
            torch.export cannot capture: use the pt2e flow).
    """
    check_bool("int8", int8)
    inputs = _inputs(example_inputs)
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
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
        prepared, batched = _prepare_for_calibration(target, inputs, calibration, per_channel)
        with torch.no_grad():
            for batch in calibration or [inputs]:
                args = _inputs(batch)
                if batched:
                    prepared(*args)
                else:  # the graph has the example's static shape: feed the batch one row at a time
                    for row in range(batch_len(args)):
                        prepared(*batch_rows(args, row, row + 1))
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



def read_sidecar(path: Path) -> dict:
    """The metadata written next to a ``.pte`` (``<path>.json``; ``{}`` if missing)."""
    side = Path(f"{path}.json")
    return json.loads(side.read_text()) if side.exists() else {}


def _load(path: Path, engine: str | None) -> Any:
    try:
        from executorch.runtime import Runtime
    except ImportError as err:
        raise ExportUnavailableError(f"loading .pte needs executorch ({err}); pip install executorch==1.5.1.") from err
    return Runtime.get().load_program(path).load_method("forward")


def _skip(model: Any, int8: bool, pt2e: bool) -> str | None:
    if int8 and not pt2e:
        return "a torch.ao int8 model: torch.export cannot capture it (the float model gets an int8 .pte by pt2e PTQ)"
    return None


register_exporter(Exporter("pte", "executorch", export_executorch, _load, read_sidecar, _skip, lambda model: "xnnpack",
                           frozenset({"int8", "per_channel", "calibration"}), order=30))
