"""Generic classification task used by every recipe.

It wraps any registered model (or a user's ``nn.Module``) as ``self.model``, the attribute the
compression callbacks operate on, and works with both batch conventions of
:mod:`lightning_eff.data`: ``(inputs, labels)`` tuples for images and ``{"labels": ..., **inputs}``
dicts for text.

Example:
    >>> task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1})
    >>> task(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_eff.batch import call_model, split_batch
from lightning_eff.models import create_model
from lightning_eff.validation import check_choice, check_int, check_number

__all__ = ["ClassificationTask", "split_batch", "configure_optimizers", "check_optimizer_options"]

OPTIMIZERS = ["sgd", "adamw"]
SCHEDULERS = ["onecycle", "cosine", "constant"]



class ClassificationTask(L.LightningModule):
    """Cross-entropy classification with torchmetrics accuracy, SGD/AdamW and a one-cycle/cosine schedule.

    Args:
        model: a registry spec ``{"name": ..., **kwargs}`` (see :func:`lightning_eff.models.create_model`)
            or an ``nn.Module``.
        num_classes: number of classes (defaults to ``model["num_classes"]``).
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``.
        lr: peak learning rate.
        weight_decay: decoupled for AdamW, L2 for SGD; not applied to norms and biases.
        momentum: SGD momentum.
        scheduler: ``"onecycle"`` (warm-up then cosine down, per step), ``"cosine"`` or ``"constant"``.
        warmup_fraction: fraction of steps spent warming up (one-cycle).
        label_smoothing: cross-entropy label smoothing.
        mixup: label mixing of training batches with timm's ``Mixup``: ``{mixup_alpha, cutmix_alpha, prob,
            switch_prob, mode, label_smoothing}`` (``conf/task/mixup/*.yaml``), or ``None``. The training loss
            is then the soft-target cross-entropy (``label_smoothing`` goes into the mixed targets); ``train/acc``
            compares predictions with each position's own, unmixed label.

    Raises:
        ConfigError: an option outside its valid range or choices.
    """

    #: What this task logs (``optimized_metric`` is checked against it before training).
    LOGGED_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc")

    def __init__(
        self,
        model: dict | nn.Module,
        num_classes: int | None = None,
        optimizer: str = "sgd",
        lr: float = 0.05,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        scheduler: str = "onecycle",
        warmup_fraction: float = 0.15,
        label_smoothing: float = 0.0,
        mixup: dict | None = None,
    ) -> None:
        super().__init__()
        check_optimizer_options(optimizer, lr, weight_decay, momentum, scheduler, warmup_fraction)
        check_number("task.label_smoothing", label_smoothing, low=0.0, high=1.0, high_inclusive=False)
        if isinstance(model, nn.Module):
            self.save_hyperparameters(ignore=["model"])
            self.model = model
        else:
            spec = dict(model)
            self.save_hyperparameters()
            self.model = create_model(spec.pop("name"), **spec)
            num_classes = num_classes or spec.get("num_classes")
        if num_classes is None:
            raise ValueError("task.num_classes is required when model is an nn.Module")
        check_int("task.num_classes", num_classes, low=2)
        self.num_classes = num_classes
        from lightning_eff.learning.augment.vision import make_mixup

        if isinstance(mixup, Mapping) and mixup and "label_smoothing" not in mixup and label_smoothing:
            mixup = {**mixup, "label_smoothing": label_smoothing}
        self.mixup = make_mixup(mixup, num_classes)
        metric = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.train_acc, self.val_acc, self.test_acc = metric.clone(), metric.clone(), metric.clone()

    def forward(self, inputs: Any) -> torch.Tensor:  # noqa: D102
        return call_model(self.model, inputs)

    def _step(self, batch: Any, stage: str, metric: torchmetrics.Metric) -> torch.Tensor:
        inputs, labels = split_batch(batch)
        if stage == "train" and self.mixup is not None:
            from lightning_eff.learning.augment.vision import (
                mix_batch,
                soft_cross_entropy,
            )

            if not (isinstance(inputs, torch.Tensor) and inputs.ndim == 4 and inputs.is_floating_point()):
                from lightning_eff.errors import ConfigError

                kind = f"a {inputs.ndim}-D {inputs.dtype} tensor" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
                raise ConfigError(f"task.mixup mixes float image batches [B,C,H,W]; this batch's inputs are {kind}. "
                                  "Set task.mixup=null (text: use data.train_transform's text augmentations).")

            inputs, targets = mix_batch(self.mixup, inputs, labels)
            logits = self(inputs)
            loss = soft_cross_entropy(logits, targets)
        else:
            logits = self(inputs)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0)
        metric.update(logits.detach(), labels)
        bs = labels.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=bs, sync_dist=stage != "train")
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=bs, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: D102
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> Any:  # noqa: D102
        return configure_optimizers(self, self.hparams)


def configure_optimizers(module: L.LightningModule, hp: Any) -> Any:
    """SGD (Nesterov) or AdamW over ``module``'s trainable parameters, no weight decay on norms and biases,
    with a per-step one-cycle, cosine or constant schedule; ``hp`` holds ``optimizer, lr, weight_decay,
    momentum, scheduler, warmup_fraction`` (every task of :mod:`lightning_eff.tasks` shares it)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if hp.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=hp.lr)
    if hp.scheduler == "constant":
        return opt
    total = max(1, int(module.trainer.estimated_stepping_batches))
    if hp.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=hp.lr, total_steps=total, pct_start=max(hp.warmup_fraction, 1e-3), anneal_strategy="cos",
            cycle_momentum=False, div_factor=10.0, final_div_factor=100.0,
        )
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def check_optimizer_options(optimizer: str, lr: float, weight_decay: float, momentum: float, scheduler: str,
                            warmup_fraction: float) -> None:
    """The optimizer options every task shares, refused with the option named (``task.<name>``)."""
    check_choice("task.optimizer", optimizer, OPTIMIZERS)
    check_choice("task.scheduler", scheduler, SCHEDULERS)
    check_number("task.lr", lr, low=0.0, low_inclusive=False, high=10.0)
    check_number("task.weight_decay", weight_decay, low=0.0, high=1.0)
    check_number("task.momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    check_number("task.warmup_fraction", warmup_fraction, low=0.0, high=1.0, high_inclusive=False)
