"""Did the sparsity buy latency? A measured answer per backend, not an assumption.

Unstructured (and N:M, block) sparsity shrinks storage, but a dense kernel multiplies the zeros
as fast as any other number: PyTorch's fp32 CPU convolutions (oneDNN, MKL) and the x86 /
QNNPACK int8 kernels are all dense. The honest test is to time the sparse model against *the
same model with its zeros filled in* — same shapes, dtypes, engine, hence the same kernels — so
the only difference left is the zeros themselves.

* :func:`weight_zero_fraction` — zeros among the conv/linear weight matrices (float, pruned via
  ``torch.nn.utils.prune`` or converted ``torch.ao`` int8 modules: a weight at its zero point is
  a zero);
* :func:`densify` — that copy: every zero weight replaced by a small non-zero value (float), or
  moved one integer step off its zero point (int8: packed again for the active engine);
* :func:`sparsity_latency` — both timed interleaved under the model's engine, the minimum per
  call kept (a neighbour process only ever adds time), with ``bought_latency`` true only when
  the sparse model is at least ``1 - margin`` faster.

Example::

    probe = sparsity_latency(int8_model, torch.randn(1, 3, 224, 224), engine="x86")
    probe["speedup"], probe["bought_latency"]   # e.g. 1.01, False
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.errors import ConfigError
from lightning_eff.measure import interleaved_min_ms, weight_tensors
from lightning_eff.validation import check_int, check_number

__all__ = ["densify", "sparsity_latency", "weight_zero_fraction", "UnsupportedModelError"]


class UnsupportedModelError(TypeError):
    """The model keeps weights where :func:`densify` cannot reach them (e.g. a TorchScript module)."""


def weight_zero_fraction(model: nn.Module) -> float:
    """Fraction of exact zeros among the *effective* weight matrices (``dim >= 2``) of ``model``.

    Biases and norm parameters are left out: pruning never targets them, and counting them would
    dilute the figure. Works for float, masked (``weight_orig * mask``) and converted int8 models.
    """
    return _zeros_and_int8(model)[0]


def _zeros_and_int8(model: nn.Module) -> tuple[float, bool]:
    """(zero fraction of the weight matrices, whether any weight is stored quantized) in one pass."""
    total = zeros = 0
    int8 = False
    for stored, effective in weight_tensors(model):
        int8 = int8 or stored.is_quantized
        if effective.dim() >= 2:
            total += effective.numel()
            zeros += int((effective == 0).sum())
    return (zeros / total if total else 0.0), int8


def _shift_zero_points(weight: Tensor) -> Tensor:
    """``weight`` (a quantized tensor) with every entry at its zero point moved one step off it."""
    ints = weight.int_repr()
    info = torch.iinfo(ints.dtype)
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                            torch.per_channel_affine_float_qparams):
        axis = weight.q_per_channel_axis()
        shape = [1] * ints.dim()
        shape[axis] = -1
        zp = weight.q_per_channel_zero_points().view(shape).to(ints.dtype)
        step = torch.where(zp < info.max, 1, -1).to(ints.dtype)
        ints = torch.where(ints == zp, zp + step, ints)
        return torch._make_per_channel_quantized_tensor(ints, weight.q_per_channel_scales(),
                                                        weight.q_per_channel_zero_points(), axis)
    zp = int(weight.q_zero_point())
    ints = torch.where(ints == zp, torch.full_like(ints, zp + 1 if zp < info.max else zp - 1), ints)
    return torch._make_per_tensor_quantized_tensor(ints, weight.q_scale(), zp)


@torch.no_grad()
def densify(model: nn.Module, fill: float = 1e-3) -> nn.Module:
    """A copy of ``model`` with no zero weights left; same shapes, dtypes and kernels.

    Float weight matrices get ``fill`` where they were exactly zero (a normal float, far from the
    denormal range that would slow the dense copy down for the wrong reason); ``torch.ao``
    quantized modules (``weight()`` / ``set_weight_bias``) get each zero-point entry moved one
    integer step and are re-packed under the current quantized engine. ``torch.nn.utils.prune``
    masks are filled too. The input model is not modified.

    Raises:
        UnsupportedModelError: TorchScript modules (their packed weights cannot be rewritten here).
        ConfigError: ``fill`` is 0 or not a finite float.
    """
    check_number("fill", fill)
    if fill == 0.0 or not math.isfinite(fill):
        raise ConfigError("densify: fill=0.0 would keep the zeros; use a small non-zero value such as 1e-3.")
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError("densify: a TorchScript module's packed weights cannot be rewritten; "
                                    "probe the nn.Module it was exported from.")
    for module in model.modules():  # torch.nn.utils.prune: the cached ``weight`` is a non-leaf that blocks deepcopy;
        for name, _ in list(module.named_parameters(recurse=False)):  # its pre-hook recomputes it every forward
            base = name[: -len("_orig")]
            if name.endswith("_orig") and isinstance(getattr(module, base, None), Tensor):
                setattr(module, base, getattr(module, base).detach())
    dense = copy.deepcopy(model)
    for module in dense.modules():
        get_weight, set_weight = getattr(module, "weight", None), getattr(module, "set_weight_bias", None)
        if callable(get_weight) and callable(set_weight):  # converted torch.ao conv / linear (packed params)
            weight = get_weight()
            if isinstance(weight, Tensor) and weight.is_quantized:
                set_weight(_shift_zero_points(weight), module.bias())
            continue
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if not tensor.is_floating_point():
                continue
            if tensor.dim() >= 2 and (name.endswith("weight") or name.endswith("_orig")):  # incl. in_proj_weight
                tensor.masked_fill_(tensor == 0, fill)
            elif name.endswith("_mask"):
                tensor.fill_(1.0)  # torch.nn.utils.prune: weight = weight_orig * weight_mask
    return dense


def sparsity_latency(
    model: nn.Module,
    inputs: Any,
    *,
    repeats: int = 15,
    margin: float = 0.1,
    engine: str | None = None,
) -> dict[str, Any]:
    """Time ``model`` against :func:`densify` (``model``) and say whether its zeros bought latency.

    Args:
        model: the sparse model (float, fake-quant or converted int8).
        inputs: one example batch (the calling convention of :func:`~lightning_eff.batch.call_with_inputs`).
        repeats: interleaved timed calls per model (after one warm-up call each).
        margin: the sparse model must be at least this fraction faster to count as a gain
            (timing noise on a shared CPU is a few percent).
        engine: the quantized engine to run under (``None``: the model's own, else the current one).

    Returns:
        ``{"zero_fraction", "sparse_ms", "dense_ms", "speedup" (dense / sparse), "bought_latency", "engine", "backend"}``
        — ``backend`` in words: ``"int8 x86"``, ``"fp32 fake-quant (x86 QAT)"`` or ``"fp32 eager CPU"``.
    """
    from lightning_eff.compression.quantization.engines import (
        model_engine,
        quantized_engine,
    )

    check_int("repeats", repeats, low=1)
    check_number("margin", margin, low=0.0, high=1.0, high_inclusive=False)
    engine = engine or model_engine(model)
    with quantized_engine(engine):
        dense = densify(model)  # int8 weights are re-packed for the engine they run under
        ms = interleaved_min_ms({"sparse": model, "dense": dense}, inputs, repeats)
    zero_fraction, int8 = _zeros_and_int8(model)
    return {
        "zero_fraction": zero_fraction,
        "sparse_ms": ms["sparse"],
        "dense_ms": ms["dense"],
        "speedup": ms["dense"] / ms["sparse"],
        "bought_latency": ms["sparse"] < (1.0 - margin) * ms["dense"],
        "engine": engine or "fp32",
        "backend": (f"int8 {engine}" if int8 else f"fp32 fake-quant ({engine} QAT)") if engine else "fp32 eager CPU",
    }
