"""Generic LightningModules the recipes train."""
from lightning_eff.batch import split_batch
from lightning_eff.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask", "split_batch"]
