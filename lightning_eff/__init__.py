"""lightning_eff: efficient deep learning (Menghani's survey) as PyTorch Lightning plugins.

Attach a technique to any LightningModule in one line::

    trainer = L.Trainer(callbacks=[QuantizationAwareTraining(engines=["x86", "qnnpack"]), FootprintMonitor()])

or run a recipe: ``python train.py +recipe=mobilenet_qat``.

The names below are imported on first use (PEP 562): ``import lightning_eff`` alone, and the light modules
(``lightning_eff.errors``, ``lightning_eff.recipes``), do not import torch or Lightning, so ``python train.py
--help`` and configuration errors answer at once.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ActivationCheckpointing": "lightning_eff.callbacks",
    "CPUAllocator": "lightning_eff.callbacks",
    "ChannelsLast": "lightning_eff.callbacks",
    "Compile": "lightning_eff.callbacks",
    "Distillation": "lightning_eff.callbacks",
    "Export": "lightning_eff.callbacks",
    "FootprintMonitor": "lightning_eff.callbacks",
    "KNNMonitor": "lightning_eff.callbacks",
    "PostTrainingQuantization": "lightning_eff.callbacks",
    "Pruning": "lightning_eff.callbacks",
    "QuantizationAwareTraining": "lightning_eff.callbacks",
    "WeightOnlyQuantization": "lightning_eff.callbacks",
    "load_sparse": "lightning_eff.compression.pruning",
    "prune": "lightning_eff.compression.pruning",
    "prune_channels": "lightning_eff.compression.pruning",
    "save_sparse": "lightning_eff.compression.pruning",
    "CIFAR10DataModule": "lightning_eff.data",
    "FashionMNISTDataModule": "lightning_eff.data",
    "ImageFolderDataModule": "lightning_eff.data",
    "TextFileDataModule": "lightning_eff.data",
    "WordNetSupersenseDataModule": "lightning_eff.data",
    "ConfigError": "lightning_eff.errors",
    "DataNotFoundError": "lightning_eff.errors",
    "ExportUnavailableError": "lightning_eff.errors",
    "NoEffectWarning": "lightning_eff.errors",
    "count_macs": "lightning_eff.measure",
    "count_nonzero_parameters": "lightning_eff.measure",
    "count_parameters": "lightning_eff.measure",
    "measure_footprint": "lightning_eff.measure",
    "measure_latency": "lightning_eff.measure",
    "saved_activation_bytes": "lightning_eff.measure",
    "create_model": "lightning_eff.models",
    "list_models": "lightning_eff.models",
    "register_model": "lightning_eff.models",
    "DDPStrategy": "lightning_eff.strategies",
    "ClassificationTask": "lightning_eff.tasks",
    "MLMTask": "lightning_eff.tasks",
    "RotationTask": "lightning_eff.tasks",
    "SimCLRTask": "lightning_eff.tasks",
    "apply_activation_checkpointing": "lightning_eff.training.checkpointing",
    "remove_activation_checkpointing": "lightning_eff.training.checkpointing",
    "register_comm_hook": "lightning_eff.training.ddp",
    "resolve_precision": "lightning_eff.training.precision",
    "measure_bf16": "lightning_eff.training.precision",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")  # a subpackage: lightning_eff.callbacks, ...
        raise AttributeError(f"module 'lightning_eff' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what static tools see: the same names, imported eagerly
    from lightning_eff.callbacks import (
        ActivationCheckpointing,
        ChannelsLast,
        Compile,
        CPUAllocator,
        Distillation,
        Export,
        FootprintMonitor,
        KNNMonitor,
        PostTrainingQuantization,
        Pruning,
        QuantizationAwareTraining,
        WeightOnlyQuantization,
    )
    from lightning_eff.compression.pruning import (
        load_sparse,
        prune,
        prune_channels,
        save_sparse,
    )
    from lightning_eff.data import (
        CIFAR10DataModule,
        FashionMNISTDataModule,
        ImageFolderDataModule,
        TextFileDataModule,
        WordNetSupersenseDataModule,
    )
    from lightning_eff.errors import (
        ConfigError,
        DataNotFoundError,
        ExportUnavailableError,
        NoEffectWarning,
    )
    from lightning_eff.measure import (
        count_macs,
        count_nonzero_parameters,
        count_parameters,
        measure_footprint,
        measure_latency,
        saved_activation_bytes,
    )
    from lightning_eff.models import create_model, list_models, register_model
    from lightning_eff.strategies import DDPStrategy
    from lightning_eff.tasks import (
        ClassificationTask,
        MLMTask,
        RotationTask,
        SimCLRTask,
    )
    from lightning_eff.training.checkpointing import (
        apply_activation_checkpointing,
        remove_activation_checkpointing,
    )
    from lightning_eff.training.ddp import register_comm_hook
    from lightning_eff.training.precision import measure_bf16, resolve_precision

__version__ = "0.1.0"

__all__ = [
    "ActivationCheckpointing",
    "CIFAR10DataModule",
    "CPUAllocator",
    "ChannelsLast",
    "Compile",
    "ClassificationTask",
    "ConfigError",
    "DDPStrategy",
    "DataNotFoundError",
    "Distillation",
    "Export",
    "ExportUnavailableError",
    "FashionMNISTDataModule",
    "FootprintMonitor",
    "ImageFolderDataModule",
    "KNNMonitor",
    "MLMTask",
    "NoEffectWarning",
    "PostTrainingQuantization",
    "Pruning",
    "QuantizationAwareTraining",
    "RotationTask",
    "SimCLRTask",
    "TextFileDataModule",
    "WeightOnlyQuantization",
    "WordNetSupersenseDataModule",
    "count_macs",
    "count_nonzero_parameters",
    "count_parameters",
    "create_model",
    "list_models",
    "load_sparse",
    "prune",
    "prune_channels",
    "save_sparse",
    "measure_footprint",
    "measure_latency",
    "register_model",
    "apply_activation_checkpointing",
    "remove_activation_checkpointing",
    "register_comm_hook",
    "resolve_precision",
    "measure_bf16",
    "saved_activation_bytes",
]
