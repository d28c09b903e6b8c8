"""Bytes of activations a training step keeps for backward, counted where autograd saves them.

Why this measure: a process's peak memory mixes weights, optimizer state, allocator caching and the
activations; activation checkpointing and mixed precision change only the last. PyTorch lets a
program see every tensor autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``):
this module counts them — each storage once (a tensor saved by several ops is one allocation), the
network's parameters and buffers left out (they exist without the step). Inside a non-reentrant
checkpoint region torch's own hooks take over, so what the region keeps (its inputs) is counted and
what it will recompute is not: exactly the saving checkpointing buys.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    >>> stats = saved_activation_bytes(net, torch.randn(32, 64))
    >>> stats["saved_bytes"] >= 32 * 256 * 4  # at least the hidden activation, fp32
    True
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.batch import call_with_inputs, first_tensor
from lightning_eff.measure.memory import process_peak_rss_mb

__all__ = ["SavedTensorCounter", "saved_activation_bytes"]


def _storage_key(t: Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / meta / wrapper subclasses
        return None
    return (storage.data_ptr(), storage.nbytes()) if storage.nbytes() else None


class SavedTensorCounter:
    """A context manager that counts the distinct storages autograd saves for backward while it is open.

    Args:
        exclude: modules whose parameters and buffers are not activations (the network).

    Attributes:
        saved_bytes: bytes of the distinct storages saved (shared storages once).
        saved_tensors: how many tensors were saved (with repeats).
    """

    def __init__(self, exclude: nn.Module | None = None) -> None:
        self._skip = set()
        if exclude is not None:
            for t in [*exclude.parameters(), *exclude.buffers()]:
                key = _storage_key(t)
                if key is not None:
                    self._skip.add(key[0])
        self._seen: dict[int, int] = {}
        self.saved_tensors = 0
        self._hooks: Any = None

    @property
    def saved_bytes(self) -> int:  # noqa: D102
        return sum(self._seen.values())

    def _pack(self, t: Tensor) -> Tensor:
        self.saved_tensors += 1
        key = _storage_key(t)
        if key is not None and key[0] not in self._skip:
            self._seen[key[0]] = max(self._seen.get(key[0], 0), key[1])
        return t

    def __enter__(self) -> SavedTensorCounter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def saved_activation_bytes(model: nn.Module, inputs: Any, loss_fn: Callable[[Any], Tensor] | None = None,
                           backward: bool = True) -> dict[str, float]:
    """One training step's saved activations (forward under the counter, then backward) and the process peak.

    Args:
        model: the network, in the mode the step should run in (``train()`` for a training step).
        inputs: what the network takes (a tensor, a tuple, a dict of keyword arguments).
        loss_fn: turns the output into a scalar (default: the sum of the first tensor of the output).
        backward: also run the backward (recomputations happen there; the gradients are left in ``.grad``).

    Returns:
        ``saved_bytes`` (distinct storages saved for backward, parameters and buffers excluded),
        ``saved_mib``, ``saved_tensors`` and ``peak_rss_mb`` (the process's peak resident memory after the step).
    """
    counter = SavedTensorCounter(exclude=model)
    with counter:
        out = call_with_inputs(model, inputs)
    if loss_fn is None:

        def loss_fn(output: Any) -> Tensor:
            logits = getattr(output, "logits", None)
            return (logits if isinstance(logits, Tensor) else first_tensor(output)).float().sum()
    loss = loss_fn(out)
    if backward and loss.requires_grad:
        loss.backward()
    return {"saved_bytes": float(counter.saved_bytes), "saved_mib": counter.saved_bytes / 2**20,
            "saved_tensors": float(counter.saved_tensors), "peak_rss_mb": process_peak_rss_mb()}
