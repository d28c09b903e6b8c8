"""Offline teachers: cached logits and pseudo-labels (survey §3.2.1: "the teacher's predictions can
be collected offline").

- :func:`compute_teacher_logits` runs the teacher once over a dataset and returns ``[N, C]`` logits
  in dataset-index order; :class:`TeacherLogitCache` stores them on disk (atomically, with a
  fingerprint of the teacher and the dataset) so the student trains later without the teacher.
- :func:`pseudo_label` lets the teacher label an unlabeled pool; with a confidence threshold only
  the examples it is sure about are kept (Xie et al., 2020, "noisy student"; survey §3.2.1).

Both read batches from a loader whose items carry their index (see
:mod:`lightning_eff.data.indexed`), so the order the loader visits examples in does not matter.

Example:
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from lightning_eff.data.indexed import IndexedCollate, IndexedDataset
    >>> ds = IndexedDataset(TensorDataset(torch.randn(6, 3), torch.zeros(6, dtype=torch.long)))
    >>> loader = DataLoader(ds, batch_size=4, collate_fn=IndexedCollate())
    >>> compute_teacher_logits(torch.nn.Linear(3, 2), loader).shape
    torch.Size([6, 2])
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.atomic import atomic_torch_save
from lightning_eff.batch import IndexedBatch, call_with_inputs
from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_number

__all__ = ["model_fingerprint", "compute_teacher_logits", "cache_teacher_logits", "TeacherLogitCache", "pseudo_label",
           "default_output_fn"]

log = logging.getLogger(__name__)


def default_output_fn(output: Any) -> Tensor:
    """Logits from a model output: ``.logits`` (Hugging Face), the first element of a tuple, or the tensor."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _batch_inputs(batch: Any) -> Any:
    from lightning_eff.batch import model_inputs

    return model_inputs(batch)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, shapes, values): changes whenever the weights do."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        if isinstance(value, Tensor):
            h.update(name.encode())
            h.update(str(tuple(value.shape)).encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                     if value.numel() else b"")
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_teacher_logits(teacher: nn.Module, loader: Iterable[IndexedBatch], *, num_examples: int | None = None,
                           inputs_fn: Callable[[Any], Any] = _batch_inputs,
                           output_fn: Callable[[Any], Tensor] = default_output_fn,
                           device: torch.device | str | None = None) -> Tensor:
    """Run ``teacher`` (in eval mode) over ``loader`` and return float32 logits ``[N, C]`` by dataset index.

    Args:
        teacher: the frozen teacher.
        loader: yields :class:`IndexedBatch` ``(index, batch)``.
        num_examples: ``N`` (default: ``len(loader.dataset)``).
        inputs_fn: the teacher's inputs from a batch (default: ``batch[0]`` / the dict minus labels).
        output_fn: logits from the teacher's output.
        device: where the teacher runs (default: where its parameters are).

    Raises:
        ConfigError: the loader's batches carry no index, or some example was never visited.
    """
    n = num_examples if num_examples is not None else len(loader.dataset)  # type: ignore[attr-defined]
    device = torch.device(device) if device is not None else next(teacher.parameters(), torch.empty(0)).device
    was_training = teacher.training
    teacher.eval()
    out: Tensor | None = None
    seen = torch.zeros(n, dtype=torch.bool)
    try:
        for batch in loader:
            if not isinstance(batch, IndexedBatch):
                raise ConfigError(
                    "computing cached teacher logits needs batches with example indices; wrap the dataset with "
                    "lightning_eff.data.indexed.IndexedDataset (or set datamodule.return_index=True)."
                )
            from lightning.fabric.utilities.apply_func import move_data_to_device

            inputs = move_data_to_device(inputs_fn(batch.batch), device)
            logits = output_fn(call_with_inputs(teacher, inputs)).float().cpu()
            if out is None:
                out = torch.zeros(n, logits.shape[1], dtype=torch.float32)
            out[batch.index] = logits
            seen[batch.index] = True
    finally:
        teacher.train(was_training)
    if out is None or not bool(seen.all()):
        missing = int((~seen).sum())
        raise ConfigError(f"the loader visited {n - missing} of {n} examples; cached logits need every example once.")
    return out


class TeacherLogitCache:
    """Teacher logits ``[N, C]`` on disk, keyed by dataset index, with what they were computed from.

    The file (``torch.save``, loadable with ``weights_only=True``) holds the logits, the teacher's
    fingerprint, ``N``, and a digest of the labels, so a cache built for another dataset split,
    another limit or another teacher is detected instead of silently misused.

    Args:
        path: the ``.pt`` file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.logits: Tensor | None = None
        self.meta: dict[str, Any] = {}

    @staticmethod
    def labels_digest(labels: Tensor | None) -> str:
        if labels is None:
            return ""
        return hashlib.sha256(labels.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, logits: Tensor, *, teacher_fingerprint: str, labels: Tensor | None = None) -> None:
        """Write atomically (a crash never leaves a truncated cache)."""
        self.logits = logits.float().contiguous()
        self.meta = {"num_examples": int(logits.shape[0]), "num_classes": int(logits.shape[1]),
                     "teacher": teacher_fingerprint, "labels": self.labels_digest(labels)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"logits": self.logits, **self.meta}, self.path)

    def load(self, *, num_examples: int | None = None, labels: Tensor | None = None,
             teacher_fingerprint: str | None = None) -> Tensor:
        """Load and check against the dataset (and teacher) it is used with.

        Raises:
            ConfigError: the file is missing, or was built for a different dataset/teacher.
        """
        if not self.exists():
            raise ConfigError(f"teacher logit cache {str(self.path)!r} does not exist; give a teacher to build it.")
        blob = torch.load(self.path, map_location="cpu", weights_only=True)
        self.logits = blob.pop("logits")
        self.meta = blob
        if num_examples is not None and num_examples != blob["num_examples"]:
            raise ConfigError(
                f"teacher logit cache {str(self.path)!r} holds {blob['num_examples']} examples but the training set has "
                f"{num_examples}; it was built for other data (another limit or split). Delete it to rebuild."
            )
        if labels is not None and blob["labels"] and self.labels_digest(labels) != blob["labels"]:
            raise ConfigError(f"teacher logit cache {str(self.path)!r} was built for other labels; delete it to rebuild.")
        if teacher_fingerprint is not None and blob["teacher"] != teacher_fingerprint:
            raise ConfigError(f"teacher logit cache {str(self.path)!r} was built by another teacher; delete it to rebuild.")
        return self.logits

    def lookup(self, index: Tensor) -> Tensor:
        """Logits of the examples ``index`` (on ``index``'s device)."""
        if self.logits is None:
            raise ConfigError("teacher logit cache used before load()/save().")
        if self.logits.device != index.device:
            self.logits = self.logits.to(index.device)
        return self.logits[index]


def cache_teacher_logits(teacher: nn.Module, datamodule: Any, path: str | os.PathLike, *,
                         device: torch.device | str | None = None) -> TeacherLogitCache:
    """Run ``teacher`` over ``datamodule``'s training split and save the logits as a :class:`TeacherLogitCache`.

    The datamodule gives the teacher *its* inputs; a student whose datamodule reads the same split
    another way (raw strings for pQRNN, WordPiece ids for the BERT teacher) trains from the file with
    ``Distillation(cache=path)`` and no teacher: examples are matched by index, and the cache's
    example count and label digest refuse any other split.

    Args:
        teacher: the trained teacher.
        datamodule: one of our datamodules (``return_index``), set up for ``"fit"``.
        path: the ``.pt`` file to write (atomically).
        device: where the teacher runs.

    Raises:
        ConfigError: the datamodule cannot carry example indices.
    """
    from lightning_eff.learning.distillation.plumbing import dataset_labels, in_order

    if not hasattr(datamodule, "return_index"):
        raise ConfigError(f"cache_teacher_logits needs a datamodule with return_index (ours); got {type(datamodule).__name__}.")
    previous = datamodule.return_index
    datamodule.return_index = True
    try:
        loader = in_order(datamodule.train_dataloader())
        logits = compute_teacher_logits(teacher, loader, device=device)
    finally:
        datamodule.return_index = previous
    cache = TeacherLogitCache(path)
    cache.save(logits, teacher_fingerprint=model_fingerprint(teacher), labels=dataset_labels(loader.dataset))
    log.info("cached teacher logits for %d examples at %s", logits.shape[0], cache.path)
    return cache


@torch.no_grad()
def pseudo_label(teacher: nn.Module, loader: Iterable[IndexedBatch], *, threshold: float = 0.0,
                 num_examples: int | None = None, inputs_fn: Callable[[Any], Any] = _batch_inputs,
                 output_fn: Callable[[Any], Tensor] = default_output_fn, temperature: float = 1.0,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher labels an unlabeled pool.

    Args:
        teacher, loader, num_examples, inputs_fn, output_fn, device: as for :func:`compute_teacher_logits`.
        threshold: keep only examples whose top softmax probability is at least this (``[0, 1)``).
        temperature: softmax temperature for the confidence.

    Returns:
        ``(indices, labels, confidence)`` of the kept pool examples, sorted by index.
    """
    check_number("threshold", threshold, low=0.0, high=1.0, high_inclusive=False)
    check_number("temperature", temperature, low=0.0, low_inclusive=False)
    logits = compute_teacher_logits(teacher, loader, num_examples=num_examples, inputs_fn=inputs_fn,
                                    output_fn=output_fn, device=device)
    conf, labels = torch.softmax(logits / temperature, dim=-1).max(-1)
    keep = (conf >= threshold).nonzero().squeeze(1)
    log.info("pseudo_label: kept %d of %d pool examples (threshold %.2f).", keep.numel(), logits.shape[0], threshold)
    return keep, labels[keep], conf[keep]
