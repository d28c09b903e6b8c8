"""``KNNMonitor``: how good a network's features are, as a metric, during (self-supervised) training.

At the end of each validation (and test) epoch it embeds up to ``bank_size`` training examples and up to
``query_size`` validation (test) examples with the network's penultimate features
(:func:`~lightning_eff.learning.ssl.contrastive.embed`, or the task's own ``embed``), classifies each
query by a weighted vote of its ``k`` nearest bank features (cosine similarity, Wu et al. 2018), and logs
``val/knn_acc`` (``test/knn_acc``). No parameters are trained, so it can watch SimCLR or rotation
pretraining — whose own losses say little about downstream accuracy — and any supervised model alike.

The bank is the first ``bank_size`` training examples *in order and unaugmented* (our datamodules: their
training set without ``augment`` / ``train_transform``; any other datamodule: its training loader, under a
forked RNG), so every probe sees the same bank and probing never changes the training run's random
stream: the callback has no state, and a resumed run probes exactly like the uninterrupted one. Under
DDP every rank computes the same probe on the same (unsharded) examples.

Example:
    >>> monitor = KNNMonitor(bank_size=64, query_size=32, k=5)
    >>> trainer = L.Trainer(callbacks=[monitor], max_epochs=1, limit_train_batches=2, limit_val_batches=2,
    ...                     logger=False, enable_checkpointing=False, enable_progress_bar=False)
    >>> trainer.fit(task, datamodule=dm)
    >>> 0.0 <= float(trainer.callback_metrics["val/knn_acc"]) <= 1.0
    True
"""
from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_eff.batch import split_batch
from lightning_eff.callbacks.base import EffCallback
from lightning_eff.callbacks.common import DEFAULT_MODULE_ATTR
from lightning_eff.errors import ConfigError
from lightning_eff.learning.ssl.contrastive import embed, knn_predict
from lightning_eff.validation import check_int, check_number

__all__ = ["KNNMonitor"]


class KNNMonitor(EffCallback):
    """Log a kNN classifier's accuracy on the network's features at each validation / test epoch end.

    Args:
        bank_size: training examples embedded as the labelled bank.
        query_size: validation / test examples classified.
        k: neighbours that vote.
        temperature: vote weight ``exp(similarity / temperature)``.
        every_n_epochs: probe every n-th validation epoch (the test probe always runs).
        module_attr: the LightningModule attribute holding the network (when the module has no ``embed``).
    """

    LOGGED_METRICS = ("val/knn_acc", "test/knn_acc")

    def __init__(self, bank_size: int = 5000, query_size: int = 2000, k: int = 20, temperature: float = 0.1,
                 every_n_epochs: int = 1, module_attr: str | None = DEFAULT_MODULE_ATTR) -> None:
        super().__init__(module_attr)
        self.bank_size = check_int("bank_size", bank_size, low=1)
        self.query_size = check_int("query_size", query_size, low=1)
        self.k = check_int("k", k, low=1)
        self.temperature = float(check_number("temperature", temperature, low=0.0, low_inclusive=False))
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, low=1)
        self.last: dict[str, float] = {}

    @property
    def state_key(self) -> str:  # noqa: D102
        return self.state_key_of(k=self.k, bank_size=self.bank_size)

    @staticmethod
    def _train_batches(dm: Any, batch_size: int = 256) -> Any:
        """The training split in order, without augmentation (our datamodules), else the training loader."""
        ds = getattr(dm, "train_set", None)
        if ds is not None and hasattr(ds, "transform") and hasattr(ds, "images"):  # image datamodules
            for start in range(0, len(ds), batch_size):
                yield ds.transform(ds.images[start : start + batch_size], augment=False), ds.labels[start : start + batch_size]
            return
        text = (getattr(dm, "datasets", None) or {}).get("train")
        if text is not None and hasattr(text, "inputs"):  # text datamodules: inputs() never augments
            for start in range(0, len(text), batch_size):
                idx = list(range(start, min(start + batch_size, len(text))))
                yield text.inputs(idx), text.labels_t[idx]
            return
        yield from dm.train_dataloader()

    def _features(self, pl_module: L.LightningModule, loader: Any, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        net_embed = getattr(pl_module, "embed", None)
        network = None if callable(net_embed) else self.network(pl_module)
        feats, labels, seen = [], [], 0
        for batch in loader:
            inputs, y = split_batch(batch)
            inputs = pl_module.transfer_batch_to_device(inputs, pl_module.device, 0)
            f = net_embed(inputs) if network is None else embed(network, inputs)
            feats.append(f.float().cpu())
            labels.append(y.cpu())
            seen += y.shape[0]
            if seen >= limit:
                break
        if not feats:
            raise ConfigError("KNNMonitor: the loader gave no batches to embed.")
        return torch.cat(feats)[:limit], torch.cat(labels)[:limit]

    def probe(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> float:
        """Embed the bank and ``split``'s queries now, return the kNN accuracy."""
        dm = trainer.datamodule
        if dm is None:
            raise ConfigError("KNNMonitor needs the Trainer to run with a datamodule (trainer.fit(model, datamodule=dm)).")
        query_loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        was_training = pl_module.training
        pl_module.eval()
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            devices = [pl_module.device] if pl_module.device.type == "cuda" else []
            with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False), torch.random.fork_rng(devices):
                bank, bank_y = self._features(pl_module, self._train_batches(dm), self.bank_size)
                query, query_y = self._features(pl_module, query_loader, self.query_size)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            pl_module.train(was_training)
        num_classes = int(max(bank_y.max(), query_y.max())) + 1
        if int(bank_y.min()) < 0:
            raise ConfigError("KNNMonitor: the training loader carries no labels (-1); the probe needs a labelled bank.")
        pred = knn_predict(query, bank, bank_y, num_classes, self.k, self.temperature)
        return float((pred == query_y).float().mean())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        acc = self.probe(trainer, pl_module, "val")
        self.last["val"] = acc
        pl_module.log("val/knn_acc", acc, prog_bar=True, sync_dist=True)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        acc = self.probe(trainer, pl_module, "test")
        self.last["test"] = acc
        pl_module.log("test/knn_acc", acc, sync_dist=True)
