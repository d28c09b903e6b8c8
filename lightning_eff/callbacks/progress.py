"""``ProgressLog``: one log line per epoch and per phase, with elapsed time — readable in a file or CI log.

A progress bar redraws one terminal line; written to a file it is either absent (it goes to the
terminal's stderr) or thousands of carriage-return fragments. A long run whose output is redirected
(``make train > log``) then shows nothing for many minutes. This callback writes plain ``logging``
lines (Hydra sends them to the console and to ``train.log``) on rank 0:

- at each training epoch's end: the epoch, the metrics logged so far (loss, accuracy), the epoch's time
  and the time since the fit started;
- when fit ends: how long training took, so the work done at fit end (PTQ calibration, conversion,
  export and verification, each logged by its callback) is visibly separate.

Example:
    >>> from lightning_eff.callbacks import ProgressLog
    >>> cb = ProgressLog(stage="fit")
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from lightning_eff.callbacks.base import EffCallback
from lightning_eff.validation import as_list

__all__ = ["ProgressLog", "format_seconds"]

log = logging.getLogger("lightning_eff.progress")
_DEFAULT_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc")


def format_seconds(seconds: float) -> str:
    """``"42 s"``, ``"3.5 min"``, ``"1.2 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressLog(EffCallback):
    """Log one line per training epoch and one when fit ends (rank 0), with elapsed times.

    Args:
        stage: a name for the lines (the CLI passes the stage: ``fit``, ``finetune``, ``teacher``).
        metrics: logged metric names to show when present (default: train/val loss and accuracy, and every
            other ``train/*`` / ``val/*`` metric ending in ``loss`` or ``acc``, e.g. ``train/ssl_loss``,
            ``val/knn_acc``; ``epoch``-suffixed variants are found too).
    """

    def __init__(self, stage: str = "fit", metrics: Sequence[str] | None = None) -> None:
        super().__init__(module_attr=None)
        self.stage = str(stage)
        self._auto = metrics is None
        self.metrics = as_list("metrics", metrics, item=str) if metrics is not None else list(_DEFAULT_METRICS)
        self._fit_start = self._epoch_start = None

    @property
    def state_key(self) -> str:  # noqa: D102
        return self.state_key_of(stage=self.stage)

    def _values(self, trainer: L.Trainer) -> str:
        found = []
        metrics = trainer.callback_metrics
        names = list(self.metrics)
        if self._auto:  # a task's own losses and accuracies (SSL, MLM, a KNNMonitor's probe)
            bases = {k[: -len("_epoch")] if k.endswith("_epoch") else k for k in metrics if not k.endswith("_step")}
            names += sorted(k for k in bases if k not in names and k.split("/", 1)[0] in ("train", "val")
                            and k.rsplit("/", 1)[-1].endswith(("loss", "acc")))
        for name in names:
            value = metrics.get(f"{name}_epoch", metrics.get(name))
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                found.append(f"{name}={float(value):.4g}")
        return " ".join(found)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._fit_start = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.is_global_zero:  # the loaders are set up by now: the steps per epoch are known
            epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
            log.info("%s: training started (%s epochs, %s steps per epoch)", self.stage, epochs, trainer.num_training_batches
                     if trainer.num_training_batches != float("inf") else "?")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if not trainer.is_global_zero or self._epoch_start is None:
            return
        now = time.perf_counter()
        total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        log.info("%s: epoch %d/%s done in %s (%s since start) %s", self.stage, trainer.current_epoch + 1, total,
                 format_seconds(now - self._epoch_start), format_seconds(now - (self._fit_start or now)), self._values(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.is_global_zero and self._fit_start is not None:
            log.info("%s: training done in %s; end-of-fit work follows (quantization, export, verification)", self.stage,
                     format_seconds(time.perf_counter() - self._fit_start))

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"version": 1}
