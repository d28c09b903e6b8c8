"""Generic LightningModules the recipes train."""
from lightning_eff.batch import split_batch
from lightning_eff.tasks.classification import ClassificationTask
from lightning_eff.tasks.mlm import MLMTask
from lightning_eff.tasks.ssl import RotationTask, SimCLRTask

__all__ = ["ClassificationTask", "MLMTask", "RotationTask", "SimCLRTask", "split_batch"]
