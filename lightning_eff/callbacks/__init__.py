"""Lightning callbacks: each decides *when* a technique of the functional core runs."""
from lightning_eff.callbacks.allocator import CPUAllocator
from lightning_eff.callbacks.checkpointing import ActivationCheckpointing
from lightning_eff.callbacks.distillation import Distillation
from lightning_eff.callbacks.export import Export
from lightning_eff.callbacks.footprint import FootprintMonitor
from lightning_eff.callbacks.knn import KNNMonitor
from lightning_eff.callbacks.layout import ChannelsLast, Compile
from lightning_eff.callbacks.progress import ProgressLog
from lightning_eff.callbacks.pruning import Pruning
from lightning_eff.callbacks.quantization import (
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_eff.callbacks.weight_only import WeightOnlyQuantization

__all__ = ["ActivationCheckpointing", "CPUAllocator", "ChannelsLast", "Compile", "Distillation", "Export", "FootprintMonitor", "KNNMonitor", "PostTrainingQuantization", "ProgressLog", "Pruning", "QuantizationAwareTraining", "WeightOnlyQuantization"]
