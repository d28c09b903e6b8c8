"""Affine (asymmetric) and symmetric b-bit quantization numerics, in plain PyTorch.

This is the readable reference for the survey "Efficient Deep Learning" (Menghani, 2021),
section 3.1.2:

* Algorithm 2 (quantize): the float range ``[x_min, x_max]`` is first extended to contain 0.0,
  so that 0.0 maps *exactly* to an integer zero point (zero padding, ReLU outputs and pruned
  weights then cost no error); ``scale = (x_max - x_min) / (q_max - q_min)``;
  ``q = clamp(round(x / scale) + zero_point, q_min, q_max)``.
* Algorithm 3 (dequantize): ``x ~= (q - zero_point) * scale``.
* Equation 3 (straight-through estimator, Bengio et al. 2013): quantize-then-dequantize in the
  forward pass, identity gradient inside the representable range and zero outside.

Everything works per tensor (scalar ``scale``/``zero_point``) and per channel (1-D ``scale`` and
``zero_point`` indexed along ``axis``). The arithmetic deliberately follows the same float32
operation order as ``torch.ao`` observers and ``torch.fake_quantize_per_*_affine`` so that our
results agree bit for bit; the production QAT path still uses torch.ao / torchao.
"""
from __future__ import annotations

import numbers

import torch

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_bool, check_int, check_number

__all__ = ["qrange", "choose_qparams", "quantize", "dequantize", "fake_quantize", "DEFAULT_EPS"]

#: Smallest scale we hand out; the same floor torch.ao observers use, so an all-zero tensor
#: still gets a valid (positive) scale instead of a division by zero.
DEFAULT_EPS = float(torch.finfo(torch.float32).eps)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Return the integer range ``(q_min, q_max)`` of a ``bits``-bit code.

    Args:
        bits: Code width, 2 to 8.
        signed: ``True`` for two's-complement ``[-2^(b-1), 2^(b-1) - 1]``, ``False`` for
            ``[0, 2^b - 1]``.

    Raises:
        ConfigError: ``bits`` is not an integer in [2, 8] or ``signed`` is not a bool.
    """
    bits = check_int("bits", bits, low=2, high=8)
    check_bool("signed", signed)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def choose_qparams(
    x_min: float | torch.Tensor,
    x_max: float | torch.Tensor,
    bits: int = 8,
    signed: bool = False,
    symmetric: bool = False,
    eps: float = DEFAULT_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``(scale, zero_point)`` for the float range ``[x_min, x_max]`` (survey Algorithm 2).

    Per tensor when ``x_min``/``x_max`` are scalars, per channel when they are 1-D tensors (one
    entry per channel). The range is extended to include 0.0 first, so ``quantize(0.0)`` is
    exactly ``zero_point``.

    Affine: ``scale = (x_max - x_min) / (q_max - q_min)``, ``zero_point = q_min - round(x_min /
    scale)`` (equal to ``round(q_min - x_min / scale)`` because ``q_min`` is an integer; this
    order matches torch.ao bit for bit), clamped to ``[q_min, q_max]``.

    Symmetric: ``scale = max(|x_min|, |x_max|) / ((q_max - q_min) / 2)``; ``zero_point = 0`` for
    signed codes and ``2^(b-1)`` (the middle code) for unsigned ones, as in torch.ao.

    Args:
        x_min: Smallest observed value(s).
        x_max: Largest observed value(s); same shape as ``x_min``.
        bits: Code width, 2 to 8.
        signed: Signed or unsigned integer range (see :func:`qrange`).
        symmetric: Symmetric range around 0 (zero point fixed) instead of affine.
        eps: Lower bound on ``scale`` (> 0), so a constant-zero tensor still gets a usable scale.

    Returns:
        ``scale`` (float32 tensor, shape of ``x_min``) and ``zero_point`` (int32 tensor, same shape).

    Raises:
        ConfigError: Bad ``bits``/``signed``/``symmetric``/``eps``, non-finite bounds,
            mismatched shapes or ``x_min > x_max``.
    """
    qmin, qmax = qrange(bits, signed)
    check_bool("symmetric", symmetric)
    check_number("eps", eps, low=0.0, low_inclusive=False)
    lo = _as_float_tensor("x_min", x_min)
    hi = _as_float_tensor("x_max", x_max, like=lo)
    if lo.shape != hi.shape:
        raise ConfigError(f"x_min has shape {tuple(lo.shape)} but x_max has shape {tuple(hi.shape)}; they must match.")
    if lo.dim() > 1:
        raise ConfigError(f"x_min/x_max must be scalars (per tensor) or 1-D (per channel); got shape {tuple(lo.shape)}.")
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ConfigError("x_min/x_max must be finite; got a NaN or infinite bound (observe some data first).")
    if (lo > hi).any():
        raise ConfigError(f"x_min must be <= x_max; got x_min={lo.tolist()} and x_max={hi.tolist()}.")
    return _qparams(lo, hi, qmin, qmax, signed, symmetric, eps)


def _qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, signed: bool, symmetric: bool, eps: float):
    """Unchecked core of :func:`choose_qparams` (observers call it on every step)."""
    # Extend the range to contain 0.0 so that zero is exactly representable (Algorithm 2).
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    eps_t = torch.tensor(eps, dtype=torch.float32, device=lo.device)
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.maximum(amax / (float(qmax - qmin) / 2), eps_t)
        mid = 0 if signed else (qmax + 1) // 2
        zero_point = torch.full_like(scale, mid, dtype=torch.int32)
    else:
        scale = torch.maximum((hi - lo) / float(qmax - qmin), eps_t)
        zero_point = qmin - torch.round(lo / scale).to(torch.int32)
        zero_point = torch.clamp(zero_point, qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize(
    x: torch.Tensor,
    scale: float | torch.Tensor,
    zero_point: int | torch.Tensor,
    bits: int = 8,
    signed: bool = False,
    axis: int | None = None,
) -> torch.Tensor:
    """Quantize ``x`` to integer codes (survey Algorithm 2): ``clamp(round(x / scale) + zp)``.

    Args:
        x: Float tensor.
        scale: Positive scale; scalar (per tensor) or 1-D with ``x.shape[axis]`` entries.
        zero_point: Integer zero point(s) in ``[q_min, q_max]``, same shape as ``scale``.
        bits: Code width, 2 to 8.
        signed: Signed or unsigned code range.
        axis: Channel axis for per-channel parameters; ``None`` for per tensor.

    Returns:
        int32 tensor of codes in ``[q_min, q_max]``, shape of ``x``.

    Raises:
        ConfigError: Bad ``bits``, ``scale <= 0``, zero point outside the range, or an ``axis``
            that does not fit ``x`` / the number of channels.
    """
    qmin, qmax = qrange(bits, signed)
    s, z = _check_qparams(x, scale, zero_point, qmin, qmax, axis)
    q, _ = _round_codes(x, s, z)
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def dequantize(
    q: torch.Tensor,
    scale: float | torch.Tensor,
    zero_point: int | torch.Tensor,
    axis: int | None = None,
) -> torch.Tensor:
    """Map integer codes back to float32 (survey Algorithm 3): ``(q - zero_point) * scale``.

    Args:
        q: Integer codes.
        scale: Positive scale(s), scalar or 1-D along ``axis``.
        zero_point: Integer zero point(s), same shape as ``scale``.
        axis: Channel axis for per-channel parameters; ``None`` for per tensor.

    Raises:
        ConfigError: ``scale <= 0`` or an ``axis`` that does not fit ``q``.
    """
    s, z = _check_qparams(q, scale, zero_point, None, None, axis)
    return (q.to(torch.float32) - z.to(torch.float32)) * s


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize -> dequantize with the straight-through estimator (survey eq. 3).

    ``round`` has zero gradient almost everywhere, so QAT pretends it is the identity: the
    gradient passes unchanged where the value is representable and is zero where it was clamped
    (moving such a value cannot change the output). The mask uses the rounded, unclamped code,
    which is exactly the rule of ``torch.fake_quantize_per_*_affine``.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q, z = _round_codes(x, scale, zero_point)
        mask = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(mask)
        out = (torch.clamp(q, qmin, qmax) - z).to(torch.float32) * scale
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return grad_out * mask.to(grad_out.dtype), None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: float | torch.Tensor,
    zero_point: int | torch.Tensor,
    bits: int = 8,
    signed: bool = False,
    axis: int | None = None,
) -> torch.Tensor:
    """Simulate quantization in float: ``dequantize(quantize(x))`` with an STE gradient.

    Args:
        x: Float tensor (any float dtype; the math runs in float32, the result has ``x.dtype``).
        scale: Positive scale(s), scalar or 1-D along ``axis``.
        zero_point: Integer zero point(s) in ``[q_min, q_max]``.
        bits: Code width, 2 to 8.
        signed: Signed or unsigned code range.
        axis: Channel axis for per-channel parameters; ``None`` for per tensor.

    Raises:
        ConfigError: Same conditions as :func:`quantize`.
    """
    qmin, qmax = qrange(bits, signed)
    s, z = _check_qparams(x, scale, zero_point, qmin, qmax, axis)
    return _FakeQuantSTE.apply(x, s, z, qmin, qmax)


def _fake_quantize_unchecked(x, scale, zero_point, qmin, qmax, axis):
    """:func:`fake_quantize` without validation, for modules whose qparams come from an observer."""
    s, z = _broadcast(x, scale, zero_point, axis)
    return _FakeQuantSTE.apply(x, s, z, qmin, qmax)


def _round_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor):
    """Unclamped codes ``round(x / scale) + zp`` as int32, and the broadcast zero point.

    We multiply by the float32 reciprocal of ``scale`` instead of dividing, because that is what
    torch's fake-quant kernels do; at exact rounding ties the two can differ by one code.
    """
    inv_scale = 1.0 / scale
    q = torch.round(x.to(torch.float32) * inv_scale).to(torch.int32) + zero_point
    return q, zero_point


def _check_qparams(x, scale, zero_point, qmin, qmax, axis):
    """Validate and broadcast ``scale``/``zero_point`` against ``x``; ``qmin=None`` skips the zp range check."""
    s = _as_float_tensor("scale", scale, like=x)
    if isinstance(zero_point, torch.Tensor):
        if zero_point.is_floating_point() and not torch.equal(zero_point, torch.round(zero_point)):
            raise ConfigError(f"zero_point must hold integers; got {zero_point.tolist()}.")
        z = zero_point.to(device=x.device, dtype=torch.int32)
    elif isinstance(zero_point, numbers.Integral) and not isinstance(zero_point, bool):
        z = torch.tensor(int(zero_point), dtype=torch.int32, device=x.device)
    else:
        raise ConfigError(f"zero_point={zero_point!r} must be an integer or an integer tensor.")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ConfigError(f"scale must be finite and > 0; got scale={s.tolist()}.")
    if s.shape != z.shape and not (s.numel() == 1 and z.numel() == 1):
        raise ConfigError(f"scale has shape {tuple(s.shape)} but zero_point has shape {tuple(z.shape)}; they must match.")
    if qmin is not None and ((z < qmin) | (z > qmax)).any():
        raise ConfigError(f"zero_point={z.tolist()} must lie in the code range [{qmin}, {qmax}].")
    if axis is None:
        if s.numel() != 1:
            raise ConfigError(
                f"axis=None means per-tensor quantization, but scale has {s.numel()} entries; "
                "pass axis=<channel dim> for per-channel parameters."
            )
    else:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -x.dim() <= axis < x.dim():
            raise ConfigError(f"axis={axis!r} is not a dimension of a {x.dim()}-D tensor; valid range: [{-x.dim()}, {x.dim() - 1}].")
        if s.dim() != 1 or s.numel() != x.shape[axis]:
            raise ConfigError(
                f"axis={axis} has {x.shape[axis]} channels but scale has shape {tuple(s.shape)}; "
                "per-channel scale/zero_point must be 1-D with one entry per channel."
            )
    return _broadcast(x, s, z, axis)


def _broadcast(x, scale, zero_point, axis):
    """Reshape 1-D per-channel parameters to ``[1, .., C, .., 1]`` so they broadcast along ``axis``."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    if not isinstance(zero_point, torch.Tensor):
        zero_point = torch.tensor(int(zero_point), dtype=torch.int32, device=x.device)
    scale = scale.to(device=x.device, dtype=torch.float32)
    zero_point = zero_point.to(device=x.device, dtype=torch.int32)
    if axis is None:
        return scale.reshape(()), zero_point.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape), zero_point.reshape(shape)


def _as_float_tensor(name: str, value, like: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` as a float32 tensor (on ``like``'s device), or a ConfigError naming ``name``."""
    device = like.device if like is not None else None
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device if device is not None else value.device, dtype=torch.float32)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} must be a number or a tensor ({type(value).__name__} given).")
    return torch.tensor(float(value), dtype=torch.float32, device=device)
