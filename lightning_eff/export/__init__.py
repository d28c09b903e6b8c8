"""Export layer: one back end per module, registered in :mod:`lightning_eff.export.registry`.

Why a layer of its own (above measurement, models and the techniques, below the report and the
callbacks): an artifact is written from whatever a technique produced (a float, FX int8 or pt2e
int8 network), so export may import the quantization engines and pt2e, never the other way round.

Back ends: :mod:`~lightning_eff.export.torchscript` (``.pt``), :mod:`~lightning_eff.export.lite`
(``.ptl``), :mod:`~lightning_eff.export.executorch` (``.pte``, XNNPACK; int8 by pt2e PTQ),
:mod:`~lightning_eff.export.onnx` (``.onnx``). :mod:`~lightning_eff.export.core` holds what they share
(atomic writes, metadata, loading as a callable :class:`Artifact`, verification against the source model).
"""
from lightning_eff.export.core import (
    METADATA_NAME,
    Artifact,
    ExportError,
    load_artifact,
    perturbed_inputs,
    read_metadata,
    sqnr_from_sums,
    verify_artifact,
)
from lightning_eff.export.executorch import export_executorch
from lightning_eff.export.lite import export_lite, mobile_optimizer_available
from lightning_eff.export.onnx import export_onnx
from lightning_eff.export.registry import (
    Exporter,
    exporter_for_path,
    formats,
    get_exporter,
    register_exporter,
)
from lightning_eff.export.torchscript import export_torchscript  # noqa: I001  (registration order = formats() order)

__all__ = [
    "ExportError", "METADATA_NAME", "export_torchscript", "export_lite", "export_executorch", "export_onnx",
    "mobile_optimizer_available", "load_artifact", "read_metadata", "verify_artifact", "sqnr_from_sums",
    "perturbed_inputs", "Artifact", "Exporter", "register_exporter", "get_exporter", "exporter_for_path", "formats",
]
