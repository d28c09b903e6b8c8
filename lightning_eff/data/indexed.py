"""Batches that carry the dataset index of every example.

Offline distillation (a teacher's logits cached on disk, keyed by example index) and pseudo-labelling
need to know *which* examples a batch holds. Rather than changing every batch format (and every
user's ``training_step``), an indexed loader yields :class:`IndexedBatch` ``(index, batch)``; the
consumer (e.g. :class:`~lightning_eff.callbacks.Distillation`) looks the index up and hands the plain
``batch`` on, so user code never sees it.

- Our datamodules: set ``datamodule.return_index = True`` (the ``Distillation`` callback does it in
  ``setup()`` when it trains from cached logits); their items are already indices.
- Any other ``Dataset``: wrap it, ``DataLoader(IndexedDataset(ds), collate_fn=IndexedCollate())``.

``IndexedBatch`` is a ``NamedTuple``, so Lightning moves it to the device like any tuple.

Example:
    >>> ds = IndexedDataset([(torch.zeros(2), 0), (torch.ones(2), 1)])
    >>> batch = IndexedCollate()([ds[1], ds[0]])
    >>> batch.index.tolist(), batch.batch[1].tolist()
    ([1, 0], [1, 0])
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from lightning_eff.batch import IndexedBatch

__all__ = ["IndexedBatch", "IndexedDataset", "IndexedCollate", "IndexCollate"]



class IndexedDataset(Dataset):
    """Wrap any map-style dataset so item ``i`` is ``(i, dataset[i])``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class IndexedCollate:
    """Collate ``(index, item)`` pairs of an :class:`IndexedDataset` into an :class:`IndexedBatch`.

    Args:
        collate_fn: collates the items themselves (``default_collate`` when ``None``).
    """

    def __init__(self, collate_fn: Callable[[list], Any] | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, pairs: Sequence[tuple[int, Any]]) -> IndexedBatch:
        index = torch.as_tensor([i for i, _ in pairs], dtype=torch.long)
        return IndexedBatch(index, self.collate_fn([item for _, item in pairs]))


class IndexCollate:
    """For datasets whose items *are* indices (ours): collate them and keep them as the batch index."""

    def __init__(self, collate_fn: Callable[[list[int]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, indices: Sequence[int]) -> IndexedBatch:
        return IndexedBatch(torch.as_tensor(list(indices), dtype=torch.long), self.collate_fn(list(indices)))
