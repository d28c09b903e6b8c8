"""lightning_eff: efficient deep learning (Menghani's survey) as PyTorch Lightning plugins.

Attach a technique to any LightningModule in one line::

    trainer = L.Trainer(callbacks=[QuantizationAwareTraining(engines=["x86", "qnnpack"]), FootprintMonitor()])

or run a recipe: ``python train.py +recipe=mobilenet_qat``.
"""
from lightning_eff.callbacks import (
    ActivationCheckpointing,
    ChannelsLast,
    Compile,
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
from lightning_eff.tasks import ClassificationTask, MLMTask, RotationTask, SimCLRTask
from lightning_eff.training.checkpointing import apply_activation_checkpointing, remove_activation_checkpointing
from lightning_eff.training.ddp import register_comm_hook
from lightning_eff.training.precision import resolve_precision

__version__ = "0.1.0"

__all__ = [
    "ActivationCheckpointing",
    "CIFAR10DataModule",
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
    "saved_activation_bytes",
]
