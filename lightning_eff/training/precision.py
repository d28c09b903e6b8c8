"""Mixed precision: Lightning's ``precision`` values, and ``auto``, which picks what the hardware accelerates.

Lightning owns mixed precision (``Trainer(precision="bf16-mixed")`` runs the forward pass under
``torch.autocast`` and, for ``"16-mixed"``, scales the loss). What it lacks is a choice that follows
the machine: the CPUs this project runs on differ — some have AVX2 only, where bf16 autocast is
*slower* than float32 (it converts every operand and has no bf16 matrix unit), others AMX tiles, where
bf16 matrix products run in hardware. AVX-512-BF16 without AMX (AMD EPYC Zen 4/5) is not enough: its
bf16 dot-product instruction does not cover depthwise convolutions and the casts, and a MobileNetV2
training step measured 1.68x slower under bf16 autocast than in float32 on such a CPU (2026-12-02). :func:`resolve_precision` turns
``"auto"`` into a concrete value once, from facts it records (:func:`precision_facts`), so the
choice is logged and written to ``results.json`` beside the figures it explains.

The rule (why):

- CUDA: ``"bf16-mixed"`` on GPUs that support bf16 (Ampere and later: same range as fp32, no loss
  scaling), else ``"16-mixed"`` (fp16 with Lightning's gradient scaler).
- CPU with ``amx_bf16`` in ``/proc/cpuinfo``: ``"bf16-mixed"`` (``avx512_bf16`` alone: ``"32-true"``, measured slower).
- anything else: ``"32-true"``.

Example:
    >>> resolve_precision("32-true")
    '32-true'
    >>> resolve_precision("auto", accelerator="cpu", flags={"amx_bf16": True})
    'bf16-mixed'
    >>> resolve_precision("auto", accelerator="cpu", flags={"avx2": True})
    '32-true'
    >>> resolve_precision("auto", accelerator="cpu", flags={"avx512_bf16": True})  # no AMX
    '32-true'
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from lightning_eff.errors import ConfigError, did_you_mean
from lightning_eff.measure.machine import cpu_flags

__all__ = ["PRECISIONS", "FLOAT32_PRECISIONS", "is_mixed", "precision_facts", "resolve_precision"]

log = logging.getLogger(__name__)

#: The values ``trainer.precision`` takes here: Lightning's and ``"auto"``.
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64",
              "transformer-engine", "transformer-engine-float16")
#: The ones that train in full float32 (QAT's fake quantization and observers need it).
FLOAT32_PRECISIONS = ("32-true", "32", 32, "64-true", "64", 64)
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # recorded in the facts
_BF16_FAST_CPU_FLAGS = ("amx_bf16",)  # what auto decides from (see the module docstring)


def _cuda_wanted(accelerator: str) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def precision_facts(accelerator: str = "auto", flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What :func:`resolve_precision` decides from: device kind, bf16 support, the CPU's bf16 flags.

    Args:
        accelerator: the Trainer's ``accelerator`` (``"auto"``, ``"cpu"``, ``"gpu"``, ``"cuda"``, ...).
        flags: the CPU flags (:func:`lightning_eff.measure.machine.cpu_flags`); tests pass their own
            to decide for a CPU that is not this one.
    """
    flags = dict(cpu_flags() if flags is None else flags)
    if _cuda_wanted(accelerator) and torch.cuda.is_available():
        return {"device": "cuda", "cuda_bf16": bool(torch.cuda.is_bf16_supported()),
                "gpu": torch.cuda.get_device_name(0)}
    return {"device": "cpu" if accelerator in ("auto", "cpu") else str(accelerator),
            "capability": flags.get("capability"),
            **{f: bool(flags.get(f, False)) for f in _BF16_CPU_FLAGS}}


def resolve_precision(precision: Any = "auto", accelerator: str = "auto",
                      flags: Mapping[str, Any] | None = None) -> str:
    """``precision`` as a Lightning value: ``"auto"`` becomes what this hardware accelerates.

    Args:
        precision: ``trainer.precision`` (one of :data:`PRECISIONS`; Lightning's integer forms too).
        accelerator: the Trainer's ``accelerator``; ``"auto"`` means CUDA when available.
        flags: CPU flags to decide from (default: this machine's).

    Returns:
        The value to give ``lightning.Trainer(precision=...)`` (values other than ``"auto"`` unchanged, as strings).

    Raises:
        ConfigError: ``precision`` is not a known value.
    """
    value = str(precision)
    if value not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not supported; choices: {list(PRECISIONS)}."
                          f"{did_you_mean(value, PRECISIONS)}")
    if value != "auto":
        return value
    facts = precision_facts(accelerator, flags)
    if facts["device"] == "cuda":
        chosen = "bf16-mixed" if facts["cuda_bf16"] else "16-mixed"
    elif facts["device"] == "cpu" and any(facts[f] for f in _BF16_FAST_CPU_FLAGS):
        chosen = "bf16-mixed"
    else:
        chosen = "32-true"
    log.info("precision=auto resolved to %r (%s)", chosen, facts)
    return chosen


def is_mixed(precision: Any) -> bool:
    """Whether a Trainer ``precision`` value computes in less than float32 (``"bf16-mixed"``, ``"16-true"``, ...)."""
    return precision not in FLOAT32_PRECISIONS
