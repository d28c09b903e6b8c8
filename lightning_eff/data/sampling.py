"""Length-bucketed sampling: training batches of similar-length texts, so per-batch padding is cheap.

Text batches are padded to their longest member (:class:`~lightning_eff.data.tokenizers.TextDataset`),
and BERT, LSTM and QRNN students pay for every padded position. Random batches of WordNet glosses
mix 4-token and 60-token texts; bucketing (the "bucket iterator" of torchtext / AllenNLP, after the
length-sorted batching of Sutskever et al., 2014 and Vaswani et al., 2017) keeps the randomness
that SGD needs while grouping similar lengths. Each epoch:

1. permute all indices with a generator seeded by ``(seed, epoch)`` (NumPy PCG64: the same order
   in every process and on every platform);
2. cut the permutation into chunks of ``bucket_size_multiplier * batch_size * num_replicas``
   indices and sort each chunk by length (stable, so equal lengths stay in random order);
3. cut each sorted chunk into *global batches* of ``batch_size * num_replicas``; every rank takes
   its contiguous ``batch_size`` slice of a global batch, so at each step all ranks hold texts of
   similar length (no rank waits for another's long batch at the gradient all-reduce);
4. shuffle the order of the full global batches; the one incomplete batch (if any) goes last, so a
   ``DataLoader(batch_size=batch_size, sampler=...)`` re-forms exactly these batches.

Why a :class:`~torch.utils.data.DistributedSampler` subclass that yields indices (not a batch
sampler): under DDP with ``use_distributed_sampler=True`` (the default) Lightning replaces any
sampler that is not a ``DistributedSampler`` by a ``DistributedSamplerWrapper``, and for training
it wraps with ``shuffle=True`` (``lightning/pytorch/trainer/connectors/data_connector.py``,
``_get_distributed_sampler``), which re-permutes the sampler's output and destroys the buckets; a
custom ``batch_sampler`` is re-instantiated or rejected. A ``DistributedSampler`` is left alone,
gets ``set_epoch`` every epoch, and shards by itself (ranks read from ``torch.distributed`` when the
process group is initialised, as Lightning's dataloader hooks run after it is).

Example:
    >>> sampler = LengthBucketSampler([5, 1, 9, 3, 7, 2], batch_size=2, seed=0)
    >>> sorted(sampler) == list(range(6))
    True
    >>> sorted(sorted(sampler.lengths[b].tolist()) for b in sampler.batches())
    [[1, 2], [3, 5], [7, 9]]
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_bool, check_int

__all__ = ["LengthBucketSampler", "example_lengths", "padded_tokens"]


def example_lengths(dataset) -> list[int]:
    """Per-example cost of a :class:`~lightning_eff.data.tokenizers.TextDataset`: token counts
    (after truncation) with a tokenizer, else whitespace word counts of the raw text (what
    projection and word-level models pay for)."""
    ids = getattr(dataset, "ids", None)
    if ids is not None:
        return [int(n) for n in ids]
    return [len(text.split()) for text in dataset.texts]


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Positions a per-batch-padded epoch computes: ``sum(len(batch) * longest in batch)``."""
    lens = np.asarray(lengths, dtype=np.int64)
    return int(sum(len(b) * int(lens[np.asarray(b, dtype=np.int64)].max()) for b in batches if len(b)))


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    num_replicas = check_int("num_replicas", num_replicas, low=1)
    rank = check_int("rank", rank, low=0)
    if rank >= num_replicas:
        raise ConfigError(f"rank={rank} must be below num_replicas={num_replicas} (ranks count from 0).")
    return num_replicas, rank


class LengthBucketSampler(DistributedSampler):
    """Shuffled, length-bucketed indices for one rank (see the module docstring).

    Use with ``DataLoader(dataset, batch_size=batch_size, sampler=sampler)`` (same ``batch_size``).
    Every index appears exactly once per epoch over all ranks, except that (like
    ``DistributedSampler``) the first few indices of the permutation are repeated to make the total
    divisible by ``num_replicas`` (or the tail is dropped with ``drop_last=True``). Order depends
    only on ``(seed, epoch, lengths, batch_size, bucket_size_multiplier, num_replicas)``; call
    :meth:`set_epoch` each epoch (Lightning does) to get a new order.

    Args:
        lengths: per-example lengths (token counts), e.g. :func:`example_lengths` of the dataset.
        batch_size: batch size per rank (the DataLoader's).
        bucket_size_multiplier: batches per sorted chunk. 1 sorts within each batch only (no
            saving); larger values group lengths more tightly at the cost of less varied batches.
        seed: base seed of the per-epoch permutations.
        num_replicas, rank: default from ``torch.distributed`` when initialised, else 1 and 0.
        drop_last: drop the tail instead of repeating indices to divide evenly among ranks.

    Raises:
        ConfigError: a negative or non-integer length, or an option out of range.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, bucket_size_multiplier: int = 100, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, drop_last: bool = False) -> None:
        lens = np.asarray(list(lengths))
        if lens.ndim != 1 or (lens.size and (not np.issubdtype(lens.dtype, np.integer) or lens.min() < 0)):
            raise ConfigError(f"lengths must be a flat sequence of non-negative integers, got dtype {lens.dtype} shape {lens.shape}.")
        self.lengths = lens.astype(np.int64)
        self.batch_size = check_int("batch_size", batch_size, low=1)
        self.bucket_size_multiplier = check_int("bucket_size_multiplier", bucket_size_multiplier, low=1)
        check_int("seed", seed, low=0)
        check_bool("drop_last", drop_last)
        num_replicas, rank = _world(num_replicas, rank)
        # DistributedSampler only needs len(dataset); it computes num_samples / total_size.
        super().__init__(range(len(self.lengths)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=drop_last)

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's global batches (``batch_size * num_replicas`` indices each, the last maybe fewer)."""
        n = len(self.lengths)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        order = rng.permutation(n)
        if self.total_size <= n:
            order = order[: self.total_size]
        else:  # repeat the first indices so every rank gets num_samples (DistributedSampler's rule)
            order = np.concatenate([order, np.resize(order, self.total_size - n)])
        step = self.batch_size * self.num_replicas
        chunk = step * self.bucket_size_multiplier
        batches: list[np.ndarray] = []
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches.extend(part[i : i + step] for i in range(0, len(part), step))
        # chunks are whole multiples of `step`, so only the epoch's very last batch can be short
        full, tail = batches, []
        if batches and len(batches[-1]) < step:
            full, tail = batches[:-1], batches[-1:]
        return [full[i] for i in rng.permutation(len(full))] + tail

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch, in order (what the DataLoader will form)."""
        out = []
        for b in self.global_batches():
            share = len(b) // self.num_replicas  # total_size is a multiple of num_replicas
            out.append(b[self.rank * share : (self.rank + 1) * share].tolist())
        return out

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return self.num_samples
