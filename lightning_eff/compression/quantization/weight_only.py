"""Weight-only b-bit quantization with densely packed storage, to make model files small.

Survey "Efficient Deep Learning" (Menghani, 2021), section 3.1.2, "weight quantization": only the
weights are stored as low-bit integer codes plus a per-channel scale (and zero point); at load
time they are dequantized back to float, so the model runs unchanged. It shrinks the download /
flash footprint (4-bit is ~1/8 of fp32), not the compute.

Schemes (per output channel = axis 0 of the weight, or one set of parameters per tensor):

* ``"affine"``: unsigned codes ``[0, 2^b - 1]`` with scale and zero point (Algorithm 2).
* ``"symmetric"``: signed codes ``[-2^(b-1), 2^(b-1) - 1]``, zero point 0, stored offset by ``2^(b-1)``.
* ``"binary"``: 1 bit, ``w ~= alpha * sign(w)`` with ``alpha = mean|w|`` (BinaryConnect,
  Courbariaux et al. 2015; the optimal scale from XNOR-Net, Rastegari et al. 2016).
* ``"ternary"``: 2-bit codes for ``{-1, 0, +1}``; threshold ``delta = 0.7 * mean|w|`` and
  ``alpha = mean(|w| : |w| > delta)`` (Ternary Weight Networks, Li et al. 2016).

Codes are packed as a little-endian bit stream: code ``i`` occupies bits ``[i*b, (i+1)*b)``, so
4-bit puts two codes per byte (first in the low nibble), 2-bit four, 1-bit eight; 3/5/6/7-bit
codes straddle bytes and are still dense. Scales are fp16 (rounded *up* for affine/symmetric so
the range stays covered; fp32 when fp16 cannot hold them), zero points uint8.

The saved file is one ``torch.save`` of uint8/fp16 tensors and plain metadata: it loads with
``torch.load(weights_only=True)`` and is written atomically (temp file + ``os.replace``).
"""
from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_eff.compression.quantization.affine import DEFAULT_EPS, qrange, quantize
from lightning_eff.errors import ConfigError, NoEffectWarning
from lightning_eff.surgery import ModuleSelector
from lightning_eff.validation import check_bool, check_choice, check_int, renamed_option

__all__ = [
    "SCHEMES",
    "DEFAULT_INCLUDE",
    "QuantizedTensor",
    "QuantizedWeights",
    "pack_codes",
    "unpack_codes",
    "quantize_weights",
    "dequantize_model",
    "save_quantized",
    "load_quantized",
    "weight_quantization_error",
    "weight_selector",
]

SCHEMES = ("affine", "symmetric", "binary", "ternary")
#: What ``include`` selects by default: every Linear and Conv2d weight.
DEFAULT_INCLUDE = (nn.Linear, nn.Conv2d)
_FORMAT, _VERSION = "lightning_eff.weight_only", 1
_DEFAULT_BITS = {"affine": 4, "symmetric": 4, "binary": 1, "ternary": 2}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes densely into a 1-D uint8 tensor of ``ceil(n * bits / 8)`` bytes.

    Raises:
        ConfigError: ``bits`` not in [1, 8] or a code does not fit in ``bits`` bits.
    """
    bits = check_int("bits", bits, low=1, high=8)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ConfigError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}; got [{int(flat.min())}, {int(flat.max())}].")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)  # one uint8 per bit, LSB first
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    out = torch.zeros(stream.shape[0], dtype=torch.uint8, device=flat.device)
    for i in range(8):
        out |= stream[:, i] << i
    return out


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as a 1-D uint8 tensor.

    Raises:
        ConfigError: ``bits`` not in [1, 8] or ``packed`` is too short for ``numel`` codes.
    """
    bits = check_int("bits", bits, low=1, high=8)
    numel = check_int("numel", numel, low=0)
    if packed.numel() < math.ceil(numel * bits / 8):
        raise ConfigError(f"packed has {packed.numel()} bytes, fewer than the {math.ceil(numel * bits / 8)} needed for numel={numel}.")
    packed = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return packed[:numel].clone()
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits].reshape(numel, bits)
    out = torch.zeros(numel, dtype=torch.uint8, device=packed.device)
    for i in range(bits):
        out |= stream[:, i] << i
    return out


@dataclass
class QuantizedTensor:
    """One quantized weight: packed codes plus what is needed to rebuild it.

    ``w ~= (code - zero_point) * scale`` per channel (affine, symmetric, ternary) or
    ``w ~= (2 * code - 1) * scale`` (binary). ``scale`` has one entry per slice along ``axis``
    (0), or is a scalar when ``axis`` is ``None``; ``zero_point`` is per channel for affine, one
    shared scalar for symmetric/ternary (it is the same for every channel) and ``None`` for binary.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    scheme: str
    bits: int
    axis: int | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of payload (codes + scales + zero points)."""
        zp = 0 if self.zero_point is None else self.zero_point.numel() * self.zero_point.element_size()
        return self.codes.numel() + self.scale.numel() * self.scale.element_size() + zp

    def dequantize(self) -> torch.Tensor:
        """The float weight (original shape and dtype)."""
        rows = self.shape[0] if self.axis is not None else 1
        u = unpack_codes(self.codes, self.bits, self.numel).to(torch.float32).reshape(rows, -1)
        scale = self.scale.to(torch.float32).reshape(-1, 1)
        if self.scheme == "binary":
            w = (2.0 * u - 1.0) * scale
        else:
            w = (u - self.zero_point.to(torch.float32).reshape(-1, 1)) * scale
        return w.reshape(self.shape).to(self.dtype)

    def to_state(self) -> dict:
        """Plain dict of tensors/str/int/list, safe for ``torch.load(weights_only=True)``."""
        state = {"codes": self.codes, "scale": self.scale, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                 "scheme": self.scheme, "bits": self.bits, "axis": self.axis}
        if self.zero_point is not None:
            state["zero_point"] = self.zero_point
        return state

    @classmethod
    def from_state(cls, state: dict) -> QuantizedTensor:
        dtype = getattr(torch, str(state["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"dtype={state['dtype']!r} in a quantized file is not a torch dtype.")
        return cls(state["codes"], state["scale"], state.get("zero_point"), tuple(int(s) for s in state["shape"]),
                   dtype, check_choice("scheme", state["scheme"], SCHEMES), int(state["bits"]), state["axis"])


class QuantizedWeights:
    """The quantized form of a model: packed weights plus every other state entry kept as-is.

    Attributes:
        tensors: ``state_dict`` key (e.g. ``"fc.weight"``) -> :class:`QuantizedTensor`.
        rest: The remaining ``state_dict`` entries (biases, BatchNorm, unselected weights), unchanged.
        aliases: Tied weights: extra key -> the key it shares its tensor with.
        config: The options used (scheme, bits, per_channel, min_params).
    """

    def __init__(self, tensors: dict, rest: dict, aliases: dict, config: dict) -> None:
        self.tensors, self.rest, self.aliases, self.config = tensors, rest, aliases, config

    def float_state_dict(self) -> dict[str, torch.Tensor]:
        """A full float ``state_dict`` with the weights dequantized."""
        sd = dict(self.rest)
        for key, qt in self.tensors.items():
            sd[key] = qt.dequantize()
        for key, target in self.aliases.items():
            sd[key] = sd[target]
        return sd

    def nbytes(self) -> int:
        """Payload bytes: packed weights plus the kept tensors."""
        return sum(qt.nbytes for qt in self.tensors.values()) + sum(t.numel() * t.element_size() for t in self.rest.values())

    def to_state(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "config": dict(self.config),
                "tensors": {k: qt.to_state() for k, qt in self.tensors.items()}, "rest": dict(self.rest), "aliases": dict(self.aliases)}

    @classmethod
    def from_state(cls, state: dict) -> QuantizedWeights:
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ConfigError(f"not a weight-only quantized file (expected format {_FORMAT!r}).")
        if state.get("version") != _VERSION:
            raise ConfigError(f"quantized file version {state.get('version')!r} is not supported; this build reads version {_VERSION}.")
        tensors = {k: QuantizedTensor.from_state(v) for k, v in state["tensors"].items()}
        return cls(tensors, dict(state["rest"]), dict(state["aliases"]), dict(state["config"]))

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __repr__(self) -> str:
        return f"QuantizedWeights({len(self.tensors)} tensors, {self.config}, {self.nbytes()} bytes)"


def quantize_weights(
    model: nn.Module,
    bits: int | None = None,
    scheme: str = "affine",
    per_channel: bool = True,
    include=DEFAULT_INCLUDE,
    min_params: int | None = None,
    exclude: Sequence[str] | str | None = None,
    module_types: Sequence[Any] | str | None = None,
    min_numel: int | None = None,
) -> QuantizedWeights:
    """Quantize the ``weight`` of selected modules to packed ``bits``-bit codes.

    The model is not modified. Only weights with at least 2 dimensions and ``min_params``
    elements are quantized (tiny tensors such as a first conv gain little and lose accuracy).

    Args:
        model: Any module.
        bits: 2..8 for ``"affine"``/``"symmetric"`` (default 4); ``"binary"`` uses 1 and
            ``"ternary"`` 2 (``None`` or that value).
        scheme: One of ``"affine"``, ``"symmetric"``, ``"binary"``, ``"ternary"``.
        per_channel: One scale per output channel (axis 0) instead of one per tensor.
        include: Module types, a regex searched in module names (``"classifier|blocks\\.[3-6]"``),
            or a list/tuple mixing both; a module is selected if any entry matches.
        min_params: Weights with fewer elements stay in their float dtype (``min_numel`` is its old name).
        exclude: Regexes searched in module names; a matching module stays float.
        module_types: Class names (or classes) a selected module must also be (``None`` = any).
            ``include``/``exclude``/``module_types``/``min_params`` are the selection options of
            every technique (:class:`lightning_eff.surgery.ModuleSelector`).

    Returns:
        A :class:`QuantizedWeights`.

    Raises:
        ConfigError: Bad ``bits``, ``scheme``, ``per_channel``, ``include``, ``exclude``, ``module_types``
            or ``min_params``.
    """
    scheme = check_choice("scheme", scheme, SCHEMES)
    bits = _check_bits(bits, scheme)
    per_channel = check_bool("per_channel", per_channel)
    min_params = renamed_option("min_params", min_params, "quantize_weights", min_numel=min_numel)
    min_params = check_int("min_params", 0 if min_params is None else min_params, low=0)
    matches = weight_selector(include, exclude, module_types)

    state = model.state_dict(keep_vars=True)
    owner = {id(t): k for k, t in reversed(list(state.items()))}  # first key of each (possibly tied) tensor
    tensors: dict[str, QuantizedTensor] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        key = f"{name}.weight" if name else "weight"
        if not isinstance(w, torch.Tensor) or key not in state or not matches(name, module):
            continue
        if w.dim() < 2 or not w.is_floating_point() or w.numel() < min_params or owner[id(w)] != key:
            continue
        tensors[key] = _quantize_tensor(w.detach(), bits, scheme, per_channel)
    if not tensors:
        warnings.warn(f"quantize_weights: include={include!r} (exclude={exclude!r}, module_types={module_types!r}, "
                      f"min_params={min_params}) selected no weight; nothing is quantized.",
                      NoEffectWarning, stacklevel=2)
    aliases = {k: owner[id(t)] for k, t in state.items() if owner[id(t)] != k and owner[id(t)] in tensors}
    rest = {k: t.detach().clone() for k, t in state.items() if k not in tensors and k not in aliases}
    config = {"scheme": scheme, "bits": bits, "per_channel": per_channel, "min_params": min_params}
    return QuantizedWeights(tensors, rest, aliases, config)


def _quantize_tensor(w: torch.Tensor, bits: int, scheme: str, per_channel: bool) -> QuantizedTensor:
    rows = w.reshape(w.shape[0] if per_channel else 1, -1).to(torch.float32)
    axis = 0 if per_channel else None
    zero_point = None
    if scheme in ("affine", "symmetric"):
        signed = scheme == "symmetric"
        qmin, qmax = qrange(bits, signed)
        lo = torch.clamp(rows.amin(dim=1), max=0.0)  # range must contain 0 (Algorithm 2)
        hi = torch.clamp(rows.amax(dim=1), min=0.0)
        if signed:
            raw = torch.maximum(-lo, hi) / (float(qmax - qmin) / 2)
        else:
            raw = (hi - lo) / float(qmax - qmin)
        scale = _store_scale(torch.clamp(raw, min=DEFAULT_EPS), round_up=True)
        s32 = scale.to(torch.float32)
        # Zero point from the *stored* scale, so the file reproduces exactly what we quantized with.
        zp = torch.zeros_like(lo, dtype=torch.int32) if signed else torch.clamp(qmin - torch.round(lo / s32).to(torch.int32), qmin, qmax)
        q = quantize(rows, s32, zp, bits, signed, axis=0)
        codes = (q - qmin).to(torch.uint8)  # signed codes shifted to unsigned for packing
        # Symmetric: every channel has the same (shifted) zero point, so store it once.
        zero_point = torch.tensor(-qmin, dtype=torch.uint8, device=w.device) if signed else zp.to(torch.uint8)
    elif scheme == "binary":
        codes = (rows >= 0).to(torch.uint8)
        scale = _store_scale(rows.abs().mean(dim=1), round_up=False)
    else:  # ternary
        absw = rows.abs()
        delta = 0.7 * absw.mean(dim=1, keepdim=True)
        keep = absw > delta
        alpha = (absw * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)
        codes = (torch.sign(rows) * keep + 1).to(torch.uint8)  # {-1, 0, +1} -> {0, 1, 2}
        scale = _store_scale(alpha, round_up=False)
        zero_point = torch.tensor(1, dtype=torch.uint8, device=w.device)  # code 1 is the weight 0.0
    if not per_channel:
        scale = scale.reshape(())
        zero_point = None if zero_point is None else zero_point.reshape(-1)[0].clone()
    return QuantizedTensor(pack_codes(codes, bits), scale, zero_point, tuple(w.shape), w.dtype, scheme, bits, axis)


def _store_scale(scale: torch.Tensor, round_up: bool) -> torch.Tensor:
    """fp16 copy of ``scale`` (rounded up if asked, so no value falls outside the code range), or fp32 if fp16 cannot hold it."""
    half = scale.to(torch.float16)
    if round_up:
        half = torch.where(half.to(torch.float32) < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    if not torch.isfinite(half).all() or ((half == 0) & (scale > 0)).any():
        return scale.clone()
    return half


def dequantize_model(model: nn.Module, qw: QuantizedWeights) -> nn.Module:
    """Load the dequantized weights (and the kept state) into ``model`` in place and return it.

    Raises:
        ConfigError: ``model``'s state keys or shapes differ from the quantized ones.
    """
    sd = qw.float_state_dict()
    target = model.state_dict()
    missing, unexpected = sorted(set(target) - set(sd)), sorted(set(sd) - set(target))
    if missing or unexpected:
        raise ConfigError(f"model does not match the quantized weights: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}.")
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in target.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ConfigError(f"model does not match the quantized weights (file vs model shapes): {bad[:5]}.")
    model.load_state_dict(sd, strict=True)
    return model


def save_quantized(model_or_qw: nn.Module | QuantizedWeights, path: str | os.PathLike, **quantize_kwargs) -> QuantizedWeights:
    """Write the quantized weights to ONE file, atomically; quantizes first if given a model.

    Args:
        model_or_qw: A model (quantized with ``quantize_kwargs``) or a :class:`QuantizedWeights`.
        path: Destination file; its directory must exist.
        **quantize_kwargs: Options of :func:`quantize_weights` (only with a model).

    Returns:
        The :class:`QuantizedWeights` that was written.

    Raises:
        ConfigError: Options given together with an already quantized object, or a bad argument type.
    """
    if isinstance(model_or_qw, nn.Module):
        qw = quantize_weights(model_or_qw, **quantize_kwargs)
    elif isinstance(model_or_qw, QuantizedWeights):
        if quantize_kwargs:
            raise ConfigError(f"options {sorted(quantize_kwargs)} only apply when saving a model, not a QuantizedWeights.")
        qw = model_or_qw
    else:
        raise ConfigError(f"model_or_qw must be an nn.Module or QuantizedWeights, got {type(model_or_qw).__name__}.")
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(qw.to_state(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers see the old file or the complete new one, never half of it
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return qw


def load_quantized(path: str | os.PathLike, model_factory_or_model: Callable[[], nn.Module] | nn.Module, map_location="cpu") -> nn.Module:
    """Read a file from :func:`save_quantized` and return a runnable float model.

    Args:
        path: The quantized file (loaded with ``weights_only=True``).
        model_factory_or_model: A fresh model of the same architecture, or a callable building one.
        map_location: Passed to ``torch.load``.

    Raises:
        ConfigError: Not a quantized file, or the model does not match it.
    """
    state = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    qw = QuantizedWeights.from_state(state)
    model = model_factory_or_model if isinstance(model_factory_or_model, nn.Module) else model_factory_or_model()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model_factory_or_model must be an nn.Module or return one; got {type(model).__name__}.")
    return dequantize_model(model, qw)


def weight_quantization_error(model: nn.Module, qw: QuantizedWeights) -> dict[str, float]:
    """Relative L2 error ``||w - w_hat|| / ||w||`` of every quantized weight (0.0 for an all-zero weight)."""
    state = model.state_dict()
    errors = {}
    for key, qt in qw.tensors.items():
        w = state[key].to(torch.float32)
        diff = torch.linalg.vector_norm(w - qt.dequantize().to(torch.float32)).item()
        norm = torch.linalg.vector_norm(w).item()
        errors[key] = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
    return errors


def _check_bits(bits, scheme: str) -> int:
    if bits is None:
        return _DEFAULT_BITS[scheme]
    if scheme in ("binary", "ternary"):
        if bits != _DEFAULT_BITS[scheme] or isinstance(bits, bool):
            raise ConfigError(f"bits={bits!r} does not fit scheme={scheme!r}, which always uses {_DEFAULT_BITS[scheme]} bit(s); pass bits=None.")
        return bits
    return check_int("bits", bits, low=2, high=8)


def weight_selector(include, exclude=None, module_types=None) -> Callable[[str, nn.Module], bool]:
    """``include`` entries are module classes or regexes searched in module names; a module matching either is taken,
    unless its name matches an ``exclude`` regex or it is not one of ``module_types``.

    Built from :class:`lightning_eff.surgery.ModuleSelector` (one selector for every technique): names are
    matched on their canonical form, so a wrapped network (``torch.compile``, checkpoint wrappers) selects alike.
    """
    entries = [include] if isinstance(include, (str, type)) or not isinstance(include, Iterable) else list(include)  # ListConfig too
    if not entries:
        raise ConfigError("include=() selects nothing; pass module types and/or a regex on module names.")
    types, patterns = [], []
    for entry in entries:
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            types.append(entry)
        elif isinstance(entry, str):
            patterns.append(entry)
        else:
            raise ConfigError(f"include entry {entry!r} must be an nn.Module subclass or a regex string on module names.")
    by_type = ModuleSelector(types=types) if types else None
    by_name = ModuleSelector(include=patterns, match="search") if patterns else None
    also = ModuleSelector(exclude=exclude, types=module_types, match="search")  # both None: every module

    def matches(name: str, module: nn.Module) -> bool:
        taken = bool((by_type and by_type.selects(name, module)) or (by_name and by_name.selects(name, module)))
        return taken and also.selects(name, module)

    return matches
