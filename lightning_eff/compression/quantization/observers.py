"""Range observers and a fake-quantize module: our readable reference for QAT numerics.

An observer watches tensors (activations or weights) and keeps a running ``[min, max]``; from it
:func:`~lightning_eff.compression.quantization.affine.choose_qparams` derives ``scale`` and
``zero_point`` (survey "Efficient Deep Learning", Menghani 2021, section 3.1.2). A plain
min/max tracks the all-time extremes; a moving average (Jacob et al. 2018, the rule of
``torch.ao``'s ``MovingAverageMinMaxObserver``) lets the range follow activations as they drift
during training and ignores rare outliers.

All state lives in registered buffers (running min/max, scale, zero point and the on/off
switches), so it is saved in ``state_dict``/Lightning checkpoints, loads with
``torch.load(weights_only=True)`` and moves with ``.to(device)``. Per-channel buffers start
empty and take their size from the first batch or from the state dict being loaded.

The production QAT path uses torch.ao / torchao; the tests check that these modules agree with
them for 8 bits.
"""
from __future__ import annotations

import torch
from torch import nn

from lightning_eff.compression.quantization.affine import (
    DEFAULT_EPS,
    _fake_quantize_unchecked,
    _qparams,
    qrange,
)
from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_bool, check_int, check_number

__all__ = ["MinMaxObserver", "FakeQuantize"]


class MinMaxObserver(nn.Module):
    """Track the range of the tensors passed through it; ``forward`` returns its input unchanged.

    Args:
        bits: Code width, 2 to 8.
        signed: Signed (``[-2^(b-1), 2^(b-1)-1]``) or unsigned (``[0, 2^b-1]``) codes.
        symmetric: Symmetric range around 0 instead of affine.
        averaging_constant: ``None`` keeps the all-time min/max; a float ``c`` in (0, 1] keeps a
            moving average ``min = (1 - c) * min + c * batch_min`` (the first batch initialises).
        per_channel_axis: ``None`` for one range per tensor, else the channel dimension (e.g. 0
            for conv/linear weights) to keep one range per channel.
        eps: Lower bound on the scale (> 0).

    Raises:
        ConfigError: Any argument outside its valid range.
    """

    def __init__(
        self,
        bits: int = 8,
        signed: bool = False,
        symmetric: bool = False,
        averaging_constant: float | None = None,
        per_channel_axis: int | None = None,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self.qmin, self.qmax = qrange(bits, signed)
        self.bits, self.signed = bits, signed
        self.symmetric = check_bool("symmetric", symmetric)
        self.averaging_constant = check_number(
            "averaging_constant", averaging_constant, low=0.0, high=1.0, low_inclusive=False, allow_none=True
        )
        self.per_channel_axis = check_int("per_channel_axis", per_channel_axis, allow_none=True)
        self.eps = check_number("eps", eps, low=0.0, low_inclusive=False)
        # +inf/-inf mark "nothing seen yet" per tensor; per channel the size is unknown until data arrives.
        shape = () if per_channel_axis is None else (0,)
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update the running range with ``x`` and return ``x`` unchanged."""
        if x.numel() == 0:
            return x
        batch_min, batch_max = self._batch_range(x.detach())
        if self.per_channel_axis is not None and self.min_val.numel() == 0:
            # First batch of a per-channel observer: adopt its size and values.
            self.min_val.resize_(batch_min.shape).copy_(batch_min)
            self.max_val.resize_(batch_max.shape).copy_(batch_max)
            return x
        if batch_min.shape != self.min_val.shape:
            raise ConfigError(
                f"per_channel_axis={self.per_channel_axis} gives {batch_min.numel()} channels for input shape "
                f"{tuple(x.shape)}, but this observer already tracks {self.min_val.numel()} channels."
            )
        if self.averaging_constant is None:
            new_min = torch.minimum(self.min_val, batch_min)
            new_max = torch.maximum(self.max_val, batch_max)
        else:
            c = self.averaging_constant
            # min + c * (batch - min) is (1 - c) * min + c * batch written the way torch.ao does it,
            # so the float32 results agree bit for bit. torch.where initialises on the first batch
            # without a host sync (the buffers still hold +/-inf then).
            new_min = torch.where(torch.isinf(self.min_val), batch_min, self.min_val + c * (batch_min - self.min_val))
            new_max = torch.where(torch.isinf(self.max_val), batch_max, self.max_val + c * (batch_max - self.max_val))
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)
        return x

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(torch.float32)
        if self.per_channel_axis is None:
            return torch.aminmax(x)
        axis = self.per_channel_axis
        if not -x.dim() <= axis < x.dim():
            raise ConfigError(
                f"per_channel_axis={axis} is not a dimension of the observed {x.dim()}-D tensor of shape "
                f"{tuple(x.shape)}; valid range: [{-x.dim()}, {x.dim() - 1}]."
            )
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return torch.aminmax(flat, dim=1)

    @property
    def has_observed(self) -> bool:
        """Whether at least one batch has been seen (host sync on accelerators)."""
        return self.min_val.numel() > 0 and bool(torch.isfinite(self.min_val).all())

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(scale, zero_point)`` for the observed range (float32 and int32 tensors).

        Raises:
            RuntimeError: Nothing has been observed yet.
        """
        if not self.has_observed:
            raise RuntimeError("MinMaxObserver.calculate_qparams() called before any data was observed; run forward first.")
        return self._calculate_qparams()

    def _calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _qparams(self.min_val, self.max_val, self.qmin, self.qmax, self.signed, self.symmetric, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _resize_buffers(self, state_dict, prefix, ("min_val", "max_val"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, signed={self.signed}, symmetric={self.symmetric}, "
            f"averaging_constant={self.averaging_constant}, per_channel_axis={self.per_channel_axis}"
        )


class FakeQuantize(nn.Module):
    """Observe the input, then quantize -> dequantize it in float with a straight-through gradient.

    Both stages have switches (``enable_observer``/``enable_fake_quant``) stored as buffers, so a
    QAT schedule that freezes the ranges after N epochs resumes from a checkpoint in the same state.

    Args:
        bits: Code width, 2 to 8.
        signed: Signed or unsigned codes.
        symmetric: Symmetric range around 0 instead of affine.
        averaging_constant: ``None`` for an all-time min/max, or the moving-average constant in (0, 1].
        per_channel_axis: ``None`` for per tensor, else the channel dimension.
        eps: Lower bound on the scale (> 0).

    Raises:
        ConfigError: Any argument outside its valid range.
    """

    def __init__(
        self,
        bits: int = 8,
        signed: bool = False,
        symmetric: bool = False,
        averaging_constant: float | None = None,
        per_channel_axis: int | None = None,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self.observer = MinMaxObserver(bits, signed, symmetric, averaging_constant, per_channel_axis, eps)
        # Empty until the observer has produced qparams: fake-quantizing with made-up defaults
        # (scale 1, zero point 0) would silently clamp every negative value.
        self.register_buffer("scale", torch.empty(0, dtype=torch.float32))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))
        self.register_buffer("observer_enabled", torch.ones(1, dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.ones(1, dtype=torch.uint8))

    def enable_observer(self, enabled: bool = True) -> FakeQuantize:
        """Turn range tracking on or off (off freezes ``scale``/``zero_point``)."""
        self.observer_enabled.fill_(int(check_bool("enabled", enabled)))
        return self

    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantize:
        """Turn quantize -> dequantize on or off (off makes the module the identity)."""
        self.fake_quant_enabled.fill_(int(check_bool("enabled", enabled)))
        return self

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The observer's current ``(scale, zero_point)``."""
        return self.observer.calculate_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ``x`` (if enabled), refresh the qparams, then fake-quantize (if enabled).

        Raises:
            RuntimeError: Fake quantization is on but no range was ever observed.
        """
        if self.observer_enabled[0] == 1:
            self.observer(x.detach())
            scale, zero_point = self.observer._calculate_qparams()
            with torch.no_grad():
                self.scale.resize_(scale.shape).copy_(scale)
                self.zero_point.resize_(zero_point.shape).copy_(zero_point)
        if self.fake_quant_enabled[0] == 1:
            if self.scale.numel() == 0:
                raise RuntimeError(
                    "FakeQuantize has no scale/zero_point yet: enable the observer for at least one batch "
                    "before enabling fake quantization, or load a state dict that has them."
                )
            axis = self.observer.per_channel_axis
            x = _fake_quantize_unchecked(x, self.scale, self.zero_point, self.observer.qmin, self.observer.qmax, axis)
        return x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _resize_buffers(self, state_dict, prefix, ("scale", "zero_point"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        obs = self.observer
        parts = [
            f"bits={obs.bits}",
            f"signed={obs.signed}",
            f"symmetric={obs.symmetric}",
            f"qrange=[{obs.qmin}, {obs.qmax}]",
            f"per_channel_axis={obs.per_channel_axis}",
            f"observer_enabled={bool(self.observer_enabled[0])}",
            f"fake_quant_enabled={bool(self.fake_quant_enabled[0])}",
        ]
        if self.scale.numel() == 1:
            parts += [f"scale={self.scale.item():.6g}", f"zero_point={int(self.zero_point.item())}"]
        elif self.scale.numel() > 1:
            parts.append(f"channels={self.scale.numel()}")
        return ", ".join(parts)


def _resize_buffers(module: nn.Module, state_dict: dict, prefix: str, names: tuple[str, ...]) -> None:
    """Give data-sized buffers the incoming shape, so a fresh module loads a trained one's state."""
    for name in names:
        incoming = state_dict.get(prefix + name)
        buf = getattr(module, name)
        if isinstance(incoming, torch.Tensor) and incoming.shape != buf.shape:
            with torch.no_grad():
                buf.resize_(incoming.shape)
