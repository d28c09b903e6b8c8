"""A compressed artifact for unstructured sparsity: bitmask + non-zero values (fp32, fp16 or int8).

The top complaint about pruning tools is "I pruned it but it is neither smaller nor faster":
a ``torch.save`` of a 90%-sparse model is exactly as large as the dense one, because the zeros
are stored. This format stores, per sparse tensor, one bit per element (``numpy.packbits``
layout, 1 = non-zero) and only the non-zero values, optionally quantized to int8 per output
channel (symmetric, ``scale = max|w| / 127``; exact zeros are still exact — and after QAT the
values are already on an int8 grid). At 90% sparsity with fp32 values that is
``1/8 + 0.1 * 4 = 0.525`` bytes per weight instead of 4 (0.13×); with int8 values 0.05×.

Weight matrices take whichever encoding is smaller (bitmask + non-zeros, or all values); 1-D
tensors (BN statistics, biases) are stored exactly (as float32), integer tensors as they are.
The file is a ``torch.save`` of a few flat tensors and an index of strings and ints, so it loads with
``torch.load(weights_only=True)``; :func:`load_sparse_state_dict` rebuilds the dense
``state_dict``. It is written atomically (temporary file, then rename).

Latency: the bitmask format is for storage and download only. The loader densifies, and dense
CPU kernels run as fast on zeros as on any value — unstructured sparsity buys no CPU latency
here (use :mod:`structured` channel pruning for that).

Example:
    >>> net = torch.nn.Linear(64, 64, bias=False)
    >>> with torch.no_grad(): _ = net.weight.mul_((torch.rand(64, 64) > 0.9).float())
    >>> blob = sparse_state_dict(net.state_dict())
    >>> torch.equal(load_sparse_state_dict(blob)["weight"], net.weight.detach())
    True
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_eff.atomic import atomic_write
from lightning_eff.errors import ConfigError
from lightning_eff.naming import float_keys, is_quant_state_key
from lightning_eff.validation import check_choice, check_number

__all__ = ["FORMAT", "VALUE_DTYPES", "sparse_state_dict", "load_sparse_state_dict", "save_sparse", "load_sparse", "sparse_bytes", "serialize_sparse"]

FORMAT = "lightning_eff.sparse/2"
VALUE_DTYPES = ("fp32", "fp16", "int8")
_VALUE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
_SMALL = 16  # integer tensors up to this size (e.g. BN's num_batches_tracked) are stored as lists


def _quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row (output channel), the granularity int8 conv/linear kernels use."""
    rows = t.shape[0] if t.dim() >= 1 else 1
    mat = t.detach().float().reshape(rows, -1)
    scale = (mat.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(mat / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)
    return q, scale


def sparse_state_dict(state_dict: Mapping[str, Any], values: str = "fp32", min_sparsity: float | None = None,
                      min_numel: int = 64) -> dict[str, Any]:
    """Encode a ``state_dict`` into a few flat buffers plus an index of plain values.

    Per float tensor of at least ``min_numel`` elements the cheaper of two encodings is chosen:
    *sparse* (bitmask + non-zero values) or *dense* (all values); with ``values="int8"``/``"fp16"``
    weight matrices (2-D and up) are stored in that dtype either way, 1-D tensors (BN, biases)
    stay exact. All payloads are concatenated into one bitmask, one value, one scale and one
    float32 buffer: ``torch.save`` spends a few hundred bytes per tensor, which would otherwise
    dominate small models.

    Args:
        state_dict: a float model's ``state_dict`` (or any ``{name: tensor}``).
        values: ``"fp32"`` (lossless), ``"fp16"`` or ``"int8"`` (per-row symmetric) for weight matrices.
        min_sparsity: force the sparse encoding above this zero fraction (``None`` = whichever is smaller).
        min_numel: tensors with fewer elements are stored exactly as they are.

    Raises:
        ConfigError: unknown ``values`` or ``min_sparsity`` outside [0, 1].
    """
    check_choice("values", values, VALUE_DTYPES)
    check_number("min_sparsity", min_sparsity, low=0.0, high=1.0, allow_none=True)
    vdtype = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}[values]
    entries: list[dict[str, Any]] = []
    bits: list[Tensor] = []
    vals: list[Tensor] = []
    scales: list[Tensor] = []
    raw: list[Tensor] = []
    other: dict[str, Tensor] = {}
    offsets = {"bits": 0, "vals": 0, "scales": 0, "raw": 0}

    def put(buffer: list[Tensor], key: str, t: Tensor) -> list[int]:
        start = offsets[key]
        buffer.append(t.reshape(-1))
        offsets[key] += t.numel()
        return [start, t.numel()]

    for key, t in state_dict.items():
        if not isinstance(t, Tensor):
            continue
        t = t.detach().cpu()
        entry: dict[str, Any] = {"key": key, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        if not t.is_floating_point() or t.is_quantized:
            if t.numel() <= _SMALL and not t.is_quantized:
                entry.update(kind="list", data=t.reshape(-1).tolist())
            else:
                entry["kind"] = "tensor"
                other[key] = t.clone()
            entries.append(entry)
            continue
        weight = t.dim() >= 2 and t.numel() >= min_numel
        if not weight:
            entry.update(kind="raw", raw=put(raw, "raw", t.float()))
            entries.append(entry)
            continue
        flat = t.reshape(-1)
        nz = flat != 0
        zeros = 1.0 - float(nz.sum()) / flat.numel()
        vbytes = _VALUE_BYTES[values]
        sparse = zeros >= min_sparsity if min_sparsity is not None else zeros * vbytes > 0.125
        if values == "int8":
            q, scale = _quantize_rows(t)
            entry["scale"] = put(scales, "scales", scale)
            payload = q
        else:
            payload = flat.to(vdtype)
        if sparse:
            packed = torch.from_numpy(np.packbits(nz.numpy().astype(np.uint8)))
            entry.update(kind="sparse", bits=put(bits, "bits", packed), values=put(vals, "vals", payload[nz]))
        else:
            entry.update(kind="dense", values=put(vals, "vals", payload))
        entries.append(entry)
    cat = lambda xs, dtype: torch.cat(xs) if xs else torch.zeros(0, dtype=dtype)  # noqa: E731
    return {
        "format": FORMAT, "values": values, "entries": entries,
        "bitmask": cat(bits, torch.uint8), "data": cat(vals, vdtype), "scales": cat(scales, torch.float32),
        "raw": cat(raw, torch.float32), "other": other,
    }


def _take(buffer: Tensor, span: list[int]) -> Tensor:
    return buffer[span[0]: span[0] + span[1]]


def load_sparse_state_dict(blob: Mapping[str, Any]) -> dict[str, Tensor]:
    """Decode :func:`sparse_state_dict` output back into a dense ``state_dict``.

    Raises:
        ConfigError: not a blob of this format.
    """
    if not isinstance(blob, Mapping) or blob.get("format") != FORMAT:
        got = blob.get("format") if isinstance(blob, Mapping) else type(blob).__name__
        raise ConfigError(f"not a {FORMAT} artifact (format={got!r}); write one with save_sparse().")
    out: dict[str, Tensor] = {}
    for e in blob["entries"]:
        dtype = getattr(torch, e["dtype"])
        shape = list(e["shape"])
        numel = math.prod(shape)
        if e["kind"] == "list":
            out[e["key"]] = torch.tensor(e["data"], dtype=dtype).reshape(shape)
            continue
        if e["kind"] == "tensor":
            out[e["key"]] = blob["other"][e["key"]]
            continue
        if e["kind"] == "raw":
            out[e["key"]] = _take(blob["raw"], e["raw"]).to(dtype).reshape(shape).clone()
            continue
        values = _take(blob["data"], e["values"]).float()
        if e["kind"] == "sparse":
            mask = torch.from_numpy(np.unpackbits(_take(blob["bitmask"], e["bits"]).numpy(), count=numel).astype(bool))
            dense = torch.zeros(numel, dtype=torch.float32)
            dense[mask] = values
        else:
            dense = values.clone()
        if "scale" in e:
            scale = _take(blob["scales"], e["scale"])
            dense = (dense.reshape(scale.numel(), -1) * scale[:, None]).reshape(-1)
        out[e["key"]] = dense.to(dtype).reshape(shape)
    return out


def serialize_sparse(blob: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(blob), buffer)
    return buffer.getvalue()


def sparse_bytes(state_dict: Mapping[str, Any], values: str = "fp32", **kwargs: Any) -> int:
    """Bytes the compressed artifact of ``state_dict`` takes (without writing a file)."""
    return len(serialize_sparse(sparse_state_dict(state_dict, values, **kwargs)))


def save_sparse(model_or_state: torch.nn.Module | Mapping[str, Any], path: str | os.PathLike, values: str = "fp32", **kwargs: Any) -> Path:
    """Write the compressed artifact of a model (or ``state_dict``) atomically; returns the path."""
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    data = serialize_sparse(sparse_state_dict(state, values, **kwargs))
    return atomic_write(path, lambda fh: fh.write(data))


def load_sparse(path: str | os.PathLike, model: torch.nn.Module | None = None) -> dict[str, Tensor] | torch.nn.Module:
    """Load an artifact with ``torch.load(weights_only=True)``: the dense ``state_dict``, or ``model`` with it loaded.

    Artifacts are written under the float network's names (:func:`~lightning_eff.naming.float_state_dict`),
    so ``model`` may be the user's float network or the model the file was written from — a QAT
    graph, whose fused names are mapped back and whose observer state is left as it is. Every
    weight in the file must land and every weight of ``model`` must be covered.

    Raises:
        TypeError: the arguments are swapped (``load_sparse(model, path)``).
        RuntimeError: the file's keys do not fit ``model`` (missing and unexpected keys named).
    """
    if isinstance(path, torch.nn.Module) or (model is not None and not isinstance(model, torch.nn.Module)):
        raise TypeError(f"load_sparse(path, model=None): the path comes first, then the model; got "
                        f"({type(path).__name__}, {type(model).__name__}).")
    state = load_sparse_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    if model is None:
        return state
    own = model.state_dict()
    if set(own) == set(state):
        model.load_state_dict(state)
        return model
    to_float = float_keys(model) or {}
    by_float = {f: k for k, f in to_float.items()}
    mapped = {by_float.get(k, k): v for k, v in state.items()}
    needed = {k for k in own if not is_quant_state_key(k)}
    missing, unexpected = sorted(needed - set(mapped)), sorted(set(mapped) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"load_sparse: {path} does not fit {type(model).__name__}: missing keys {missing[:10]}, "
                           f"unexpected keys {unexpected[:10]}.")
    model.load_state_dict(mapped, strict=False)
    return model
