"""Generic LightningModules the recipes train."""
from lightning_eff.tasks.classification import ClassificationTask, split_batch

__all__ = ["ClassificationTask", "split_batch"]
