"""Plumbing of the :class:`~lightning_eff.callbacks.Distillation` callback: features from hooked module
outputs, the training set as an ordered index-carrying loader, and optimizer groups for projections."""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch import Tensor, nn

from lightning_eff.data.indexed import IndexCollate, IndexedCollate
from lightning_eff.errors import ConfigError

__all__ = ["module_feature", "sequential_indexed_loader", "dataset_labels", "ensure_in_optimizer"]

log = logging.getLogger(__name__)

def module_feature(output: Any, attention: bool, name: str) -> Tensor:
    """The tensor of a hooked module's output: hidden states, or attention probabilities."""
    if attention:
        weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
        if weights is None:
            raise ConfigError(
                f"layers: {name!r} returned no attention weights; attention_kl needs eager attention "
                "(e.g. BertClassifier(attn_implementation='eager')) on a self-attention module."
            )
        return weights
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ConfigError(f"layers: {name!r} returned {type(output).__name__}, not a tensor of features.")


def sequential_indexed_loader(trainer: L.Trainer):
    """The training set in order, batches carrying indices, without consuming the global RNG."""
    dm = trainer.datamodule
    return in_order(dm.train_dataloader() if dm is not None else trainer.fit_loop._data_source.dataloader())


def in_order(loader: Any):
    """``loader``'s dataset and index-carrying collate, every example once, in order (no sampler, no drop_last)."""
    from torch.utils.data import DataLoader

    collate = loader.collate_fn
    dataset = loader.dataset
    if not isinstance(collate, (IndexCollate, IndexedCollate)):
        raise ConfigError("Distillation(cache=...) needs batches with example indices: use one of our datamodules or "
                          "wrap your dataset in lightning_eff.data.indexed.IndexedDataset with IndexedCollate.")
    return DataLoader(dataset, batch_size=loader.batch_size or 256, shuffle=False, collate_fn=collate)


def dataset_labels(dataset: Any) -> Tensor | None:
    """The label tensor of our datasets (``labels`` / ``labels_t``) or a ``TensorDataset``'s second tensor."""
    for attr in ("labels", "labels_t"):
        value = getattr(dataset, attr, None)
        if isinstance(value, Tensor):
            return value
    inner = getattr(dataset, "dataset", None)
    tensors = getattr(inner, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) > 1 and isinstance(tensors[1], Tensor):
        return tensors[1]
    return None


def ensure_in_optimizer(trainer: L.Trainer, params: list[nn.Parameter]) -> None:
    """Add ``params`` as a new group of the first optimizer unless some optimizer already has them.

    The new group copies the first group's hyper-parameters (lr, betas, scheduler keys such as
    ``initial_lr``/``max_lr``), and schedulers that keep per-group base rates get one more entry.
    """
    if not params or not trainer.optimizers:
        return
    present = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    missing = [p for p in params if id(p) not in present]
    if not missing:
        return
    opt = trainer.optimizers[0]
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    opt.add_param_group({"params": missing, **group})
    for config in trainer.lr_scheduler_configs:
        sched = config.scheduler
        if getattr(sched, "optimizer", None) is opt:
            for attr in ("base_lrs", "_last_lr"):
                values = getattr(sched, attr, None)
                if isinstance(values, list) and len(values) == len(opt.param_groups) - 1:
                    values.append(values[0])
    log.info("Distillation: added %d projection parameters to the optimizer.", len(missing))
