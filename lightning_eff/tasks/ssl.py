"""Self-supervised pretraining tasks for image backbones: SimCLR and rotation prediction (survey §3.2.3).

Both keep the network as ``self.model`` (the registry model the fine-tuning stage uses, its classifier
left untrained) and their own head outside it (``self.projector`` / ``self.rotation_head``), so the
``model.*`` weights of their checkpoint are exactly the fine-tuning model's: a stage that
``hands_over: backbone`` or a ``model.backbone_ckpt=<.ckpt>`` loads them with matching keys. Labels in
the batch are ignored (a :class:`~lightning_eff.callbacks.KNNMonitor` may read them to report how good
the features are).

Example:
    >>> task = SimCLRTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}, temperature=0.5)
    >>> loss = task.training_step((torch.randn(8, 1, 32, 32), torch.zeros(8, dtype=torch.long)), 0)
    >>> loss.ndim, bool(loss > 0)
    (0, True)
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_eff.batch import split_batch
from lightning_eff.errors import ConfigError
from lightning_eff.learning.ssl.contrastive import (
    SimCLRViews,
    embed,
    nt_xent,
    projection_head,
    rotate_batch,
)
from lightning_eff.models import create_model
from lightning_eff.tasks.classification import (
    check_optimizer_options,
    configure_optimizers,
)
from lightning_eff.tasks.draws import StepDraws
from lightning_eff.validation import build_node, check_number

__all__ = ["SimCLRTask", "RotationTask"]


class _PretrainTask(StepDraws, L.LightningModule):
    """Shared: build ``self.model`` from a spec or take a module, optimizer options, and ``embed``.

    Training draws (SimCLR's views) come from :class:`~lightning_eff.tasks.draws.StepDraws`: the same
    batch gets the same views in an uninterrupted fit and in one resumed with ``fit(ckpt_path=...)``.
    """

    def __init__(self, model: Mapping | nn.Module, optimizer: str, lr: float, weight_decay: float, momentum: float,
                 scheduler: str, warmup_fraction: float) -> None:
        super().__init__()
        check_optimizer_options(optimizer, lr, weight_decay, momentum, scheduler, warmup_fraction)
        if isinstance(model, nn.Module):
            self.save_hyperparameters(ignore=["model", "views"])
            self.model = model
        elif isinstance(model, Mapping) and "name" in model:
            self.save_hyperparameters(ignore=["views"])
            spec = dict(model)
            self.model = create_model(spec.pop("name"), **spec)
        else:
            raise ConfigError(f"task.model={model!r} must be an nn.Module or a registry spec {{name: ..., ...}}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102  (the network's own output)
        return self.model(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone features the kNN probe and the fine-tuning stage use."""
        return embed(self.model, x)

    def _feature_dim(self) -> int:
        from lightning_eff.learning.ssl.contrastive import embedding_dim

        return embedding_dim(self.model, None)

    def configure_optimizers(self) -> Any:  # noqa: D102
        return configure_optimizers(self, self.hparams)


class SimCLRTask(_PretrainTask):
    """SimCLR: two random views of each image through the encoder f and projection head g, NT-Xent on g's output.

    Args:
        model: registry spec or ``nn.Module`` (the encoder f is its feature extractor, see
            :func:`~lightning_eff.learning.ssl.contrastive.embed`).
        temperature: NT-Xent temperature (SimCLR: 0.5 for CIFAR-sized data, 0.1 with large batches).
        projection_dim, hidden_dim: g's output and hidden width (hidden defaults to the feature width).
        views: a :class:`~lightning_eff.learning.ssl.contrastive.SimCLRViews` (or a ``_target_`` node / a
            mapping of its options).
        optimizer, lr, weight_decay, momentum, scheduler, warmup_fraction: as in ``ClassificationTask``.
    """

    LOGGED_METRICS = ("train/ssl_loss", "val/ssl_loss", "test/ssl_loss")

    def __init__(self, model: Mapping | nn.Module, temperature: float = 0.5, projection_dim: int = 128,
                 hidden_dim: int | None = None, views: Any = None, optimizer: str = "sgd", lr: float = 0.3,
                 weight_decay: float = 1e-4, momentum: float = 0.9, scheduler: str = "onecycle",
                 warmup_fraction: float = 0.1) -> None:
        super().__init__(model, optimizer, lr, weight_decay, momentum, scheduler, warmup_fraction)
        check_number("task.temperature", temperature, low=0.0, low_inclusive=False, high=10.0)
        if isinstance(views, Mapping) and "_target_" not in views:
            views = SimCLRViews(**views)
        self.views = build_node(views, "task.views") if views is not None else SimCLRViews()
        if not callable(self.views):
            raise ConfigError(f"task.views={views!r} must make a view of a batch (a SimCLRViews or a callable).")
        self.temperature = float(temperature)
        self.projector = projection_head(self._feature_dim(), hidden_dim, projection_dim)

    def _loss(self, x: torch.Tensor, both: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        if b < 2:
            raise ConfigError("SimCLR needs at least 2 images per batch (the other images are the negatives).")
        if both is None:
            both = torch.cat([self.views(x), self.views(x)])
        # one forward of both views: BatchNorm sees both
        z = self.projector(self.embed(both))
        return nt_xent(z[:b], z[b:], self.temperature)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: D102
        x, _ = split_batch(batch)
        with self.step_rng(batch_idx, x.device):  # resume-exact views (the global stream is left alone)
            both = torch.cat([self.views(x), self.views(x)])
        loss = self._loss(x, both)
        self.log("train/ssl_loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        x, _ = split_batch(batch)
        if x.shape[0] < 2:
            return
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(batch_idx)  # the same views every epoch: comparable validation losses
            loss = self._loss(x)
        self.log(f"{stage}/ssl_loss", loss, prog_bar=stage == "val", batch_size=x.shape[0], sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch, batch_idx, "test")


class RotationTask(_PretrainTask):
    """Rotation prediction: each image at 0/90/180/270 degrees, a 4-way head on the encoder's features.

    Args:
        model: registry spec or ``nn.Module`` (square images).
        optimizer, lr, weight_decay, momentum, scheduler, warmup_fraction: as in ``ClassificationTask``.
    """

    LOGGED_METRICS = ("train/rot_loss", "train/rot_acc", "val/rot_loss", "val/rot_acc", "test/rot_loss", "test/rot_acc")

    def __init__(self, model: Mapping | nn.Module, optimizer: str = "sgd", lr: float = 0.1, weight_decay: float = 5e-4,
                 momentum: float = 0.9, scheduler: str = "onecycle", warmup_fraction: float = 0.1) -> None:
        super().__init__(model, optimizer, lr, weight_decay, momentum, scheduler, warmup_fraction)
        self.rotation_head = nn.Linear(self._feature_dim(), 4)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, _ = split_batch(batch)
        rotated, labels = rotate_batch(x)
        logits = self.rotation_head(self.embed(rotated))
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean()
        sync = stage != "train"
        self.log(f"{stage}/rot_loss", loss, prog_bar=stage != "test", batch_size=rotated.shape[0], sync_dist=sync)
        self.log(f"{stage}/rot_acc", acc, batch_size=rotated.shape[0], sync_dist=sync)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # noqa: D102
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._step(batch, "test")
