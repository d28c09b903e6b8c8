"""Batch conventions: the floor every layer above shares (no ``lightning_eff`` imports but ``errors``).

Why a module of its own: measuring, exporting, distilling and every callback must agree on what a
batch *is* — which part is the model's input, how a model is called with it, how many rows it has,
how to make a batch of another size — and on how the index-carrying batches of offline
distillation look. Before, these lived in the footprint module, the callback helpers and the task,
so the floor imported the roof. Here they are one module at the bottom of the import graph.

Inputs follow one convention throughout: a tensor is passed as the single argument, a tuple is
unpacked as positional arguments, a dict as keyword arguments; anything else (e.g. a list of
strings for a text model) is passed as one argument.

Example:
    >>> inputs, labels = split_batch((torch.zeros(4, 3), torch.tensor([0, 1, 0, 1])))
    >>> batch_len(inputs), resize_batch(inputs, 6).shape[0], batch_rows(inputs, 1, 3).shape[0]
    (4, 6, 2)
    >>> model_inputs(IndexedBatch(torch.arange(2), (torch.ones(2, 3), torch.zeros(2)))).shape
    torch.Size([2, 3])
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_int

__all__ = ["IndexedBatch", "model_inputs", "split_batch", "call_with_inputs", "call_model", "resize_batch", "batch_rows",
           "batch_len", "first_tensor", "input_args", "flatten", "to_cpu", "cpu_copy"]


class IndexedBatch(NamedTuple):
    """A batch plus the dataset index (``int64 [B]``) of each of its examples (see :mod:`lightning_eff.data.indexed`)."""

    index: Tensor
    batch: Any


def flatten(value: Any) -> Iterator[Any]:
    """The leaves of nested tuples/lists, in order."""
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from flatten(item)
    else:
        yield value


def first_tensor(inputs: Any) -> Tensor | None:
    """The first tensor in a (nested) batch, or ``None``."""
    values = inputs.values() if isinstance(inputs, Mapping) else flatten(inputs)
    for value in values:
        found = value if isinstance(value, Tensor) else None
        if found is None and isinstance(value, (Mapping, tuple, list)):
            found = first_tensor(value)
        if found is not None:
            return found
    return None


def input_args(example_inputs: Any) -> tuple:
    """Example inputs as the positional-argument tuple a trace / export / prepare call takes.

    Raises:
        ConfigError: neither a tensor nor a non-empty tuple / list.
    """
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tensor or a non-empty tuple, got {type(example_inputs).__name__}.")


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """Return ``(model_inputs, labels)`` for a tuple batch or a dict batch with a ``labels`` key."""
    if isinstance(batch, IndexedBatch):
        batch = batch.batch
    if isinstance(batch, dict):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    inputs, labels = batch[0], batch[1]
    return inputs, labels


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` with a tensor, or with a dict of keyword inputs; unwrap HF-style outputs to logits."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(out, "logits", out)


def model_inputs(batch: Any) -> Any:
    """Inputs part of a dataloader batch: ``batch[0]`` of a tuple/list, a dict minus its labels.

    An :class:`~lightning_eff.data.indexed.IndexedBatch` (training batches while offline
    distillation is on) is unwrapped first: its index tensor is not an input.
    """
    if isinstance(batch, IndexedBatch):
        batch = batch.batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in ("labels", "label")}
    return batch


def to_cpu(value: Any) -> Any:
    """Detach and move tensors (nested in dicts/lists) to CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_cpu(v) for v in value)
    return value


def cpu_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode, so measuring or converting never touches the model being trained."""
    return copy.deepcopy(model).cpu().eval()



def call_with_inputs(fn: Callable[..., Any], inputs: Any) -> Any:
    """Call ``fn`` with ``inputs``: tuple -> ``*args``, dict -> ``**kwargs``, anything else -> one argument."""
    if isinstance(inputs, tuple):
        return fn(*inputs)
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    return fn(inputs)


def resize_batch(inputs: Any, batch_size: int) -> Any:
    """Make a batch of ``batch_size`` from an example batch by repeating (or slicing) along dim 0.

    Row ``i`` of the result is row ``i % n`` of the example, so a batch of 1 becomes a batch of
    32 copies and a batch of 16 becomes its first example. Tensors of any rank >= 1, lists of
    strings and the values of dicts / items of tuples are resized; other values pass through.
    """
    check_int("batch_size", batch_size, low=1)
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            return inputs
        index = torch.arange(batch_size, device=inputs.device) % inputs.shape[0]
        return inputs.index_select(0, index)
    if isinstance(inputs, Mapping):
        return {key: resize_batch(value, batch_size) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(resize_batch(value, batch_size) for value in inputs)
    if isinstance(inputs, list) and inputs and all(isinstance(item, str) for item in inputs):
        return [inputs[i % len(inputs)] for i in range(batch_size)]
    if isinstance(inputs, list):
        return [resize_batch(value, batch_size) for value in inputs]
    return inputs


def batch_rows(inputs: Any, start: int, stop: int | None = None) -> Any:
    """Rows ``start:stop`` of a batch: tensors and lists along dim 0, dict values and tuple items alike."""
    if isinstance(inputs, (Tensor, list)):
        return inputs[start:stop]
    if isinstance(inputs, Mapping):
        return {key: batch_rows(value, start, stop) for key, value in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(batch_rows(value, start, stop) for value in inputs)
    return inputs


def batch_len(inputs: Any) -> int:
    """Number of rows of a batch (tensor, list, or the first value of a dict / tuple)."""
    if isinstance(inputs, (Tensor, list)):
        return len(inputs)
    values = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs) if isinstance(inputs, tuple) else []
    if not values:
        raise ConfigError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}.")
    return batch_len(values[0])

