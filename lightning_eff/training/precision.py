"""Mixed precision: Lightning's ``precision`` values, and ``auto``, which picks what makes *this* training faster.

Lightning owns mixed precision (``Trainer(precision="bf16-mixed")`` runs the forward pass under
``torch.autocast`` and, for ``"16-mixed"``, scales the loss). What it lacks is a choice that follows
the machine: the CPUs this project runs on differ — some have AVX2 only, where bf16 autocast is
*slower* than float32 (it converts every operand and has no bf16 matrix unit), others AMX tiles, where
bf16 matrix products run in hardware. Hardware alone does not decide it either: on an Intel Xeon with
AMX, ``make train``'s MobileNetV2 (width 0.5, 32 px, batch 128, channels-last) took **1.50x** the fp32
step under bf16 autocast (304 vs 202 ms, ``make train``'s own measurement, 2026-12-03) — its depthwise convolutions and small 1x1 GEMMs
gain nothing from the tiles and pay for every cast — and on an AMD EPYC with AVX-512-BF16 but no AMX
1.68x. So :func:`choose_precision` *measures* where bf16 hardware exists: a few forward+backward steps of
a copy of the model on a real batch, fp32 and bf16 autocast alternating (:func:`measure_bf16`), and picks
bf16 only where it is at least :data:`BF16_MIN_SPEEDUP` faster. The choice, the facts and the measured
times are logged and written to ``results.json``.

The rule (why):

- CUDA: ``"bf16-mixed"`` on GPUs that support bf16 (Ampere and later: same range as fp32, no loss
  scaling), else ``"16-mixed"`` (fp16 with Lightning's gradient scaler).
- CPU with ``amx_bf16`` or ``avx512_bf16`` and a ``measure`` given: ``"bf16-mixed"`` when the measured
  bf16/fp32 step-time ratio is at most :data:`BF16_MIN_SPEEDUP`, else ``"32-true"``.
- CPU with ``amx_bf16`` and nothing to measure (e.g. ranks started by torchrun or srun, which must all choose
  the same): ``"bf16-mixed"`` (``avx512_bf16`` alone: ``"32-true"``, measured slower).
- anything else: ``"32-true"``.

Example:
    >>> resolve_precision("32-true")
    '32-true'
    >>> resolve_precision("auto", accelerator="cpu", flags={"amx_bf16": True})
    'bf16-mixed'
    >>> resolve_precision("auto", accelerator="cpu", flags={"amx_bf16": True},
    ...                   measure=lambda: {"fp32_ms": 187.0, "bf16_ms": 284.0, "ratio": 1.51})
    '32-true'
    >>> resolve_precision("auto", accelerator="cpu", flags={"avx2": True})
    '32-true'
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_eff.batch import call_with_inputs, first_tensor
from lightning_eff.errors import ConfigError, did_you_mean
from lightning_eff.measure.machine import cpu_flags
from lightning_eff.measure.timing import time_interleaved
from lightning_eff.validation import check_bool, check_int, check_number

__all__ = ["PRECISIONS", "FLOAT32_PRECISIONS", "BF16_MIN_SPEEDUP", "is_mixed", "precision_facts", "measure_bf16",
           "check_precision", "choose_precision", "resolve_precision"]

log = logging.getLogger(__name__)

#: The values ``trainer.precision`` takes here: Lightning's and ``"auto"``.
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64",
              "transformer-engine", "transformer-engine-float16")
#: The ones that train in full float32 (QAT's fake quantization and observers need it).
FLOAT32_PRECISIONS = ("32-true", "32", 32, "64-true", "64", 64)
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # recorded in the facts
_BF16_FAST_CPU_FLAGS = ("amx_bf16",)  # what auto decides from when it cannot measure (see the module docstring)
#: ``auto`` picks bf16 autocast on a CPU only where its measured step time is at most this fraction of
#: float32's: bf16 changes the numerics (another loss trajectory), so it has to pay clearly, above the noise.
BF16_MIN_SPEEDUP = 0.9


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


def _reduce(out: Any) -> torch.Tensor:
    """One scalar from a model's output (tensor, HF output with ``logits``, tuple or dict of tensors) to backward."""
    def leaves(value: Any) -> Any:
        value = getattr(value, "logits", value)
        if isinstance(value, Mapping):
            for item in value.values():
                yield from leaves(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                yield from leaves(item)
        else:
            yield value

    floats = [v.float().mean() for v in leaves(out) if isinstance(v, torch.Tensor) and v.is_floating_point()
              and v.requires_grad]
    if not floats:
        raise ValueError(f"the model's output ({type(out).__name__}) holds no tensor that needs a gradient")
    return torch.stack(floats).sum()


def measure_bf16(model: nn.Module, inputs: Any, *, channels_last: bool = False, rounds: int = 5,
                 budget_s: float = 10.0) -> dict[str, Any]:
    """Training-step time of ``model`` on ``inputs`` in float32 and under bf16 CPU autocast, side by side.

    A copy of the model in train mode runs forward + backward (no optimizer step: the update's cost does not
    depend on the autocast) once each to warm up, then the two alternate in rounds of one step each
    (:func:`~lightning_eff.measure.timing.time_interleaved`), so drift on a shared machine hits both; the
    medians are compared. The model, its buffers (BatchNorm statistics)
    and the random number generator's state are left as they were.

    Args:
        model: the network (a tensor input is passed as the argument, a tuple unpacked, a dict as keywords).
        inputs: one real training batch's inputs (its batch size is the one that counts).
        channels_last: time the copy in channels-last layout (4-D weights and inputs), as ``ChannelsLast`` trains it.
        rounds: at most this many rounds (fewer when the warm-up says ``budget_s`` would not hold them; at least one).
        budget_s: seconds the rounds may take after the warm-up.

    Returns:
        ``fp32_ms``, ``bf16_ms`` (medians), ``ratio`` (bf16 / fp32), ``rounds``, ``batch_shape``.
    """
    check_bool("channels_last", channels_last)
    rounds = check_int("rounds", rounds, low=1)
    budget_s = float(check_number("budget_s", budget_s, low=0.0))
    net = copy.deepcopy(model).cpu().train()
    if channels_last:
        from lightning_eff.training.layout import to_channels_last

        to_channels_last(net)
    params = [p for p in net.parameters() if p.requires_grad]

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = _reduce(call_with_inputs(net, inputs))
        loss.backward()
        for p in params:
            p.grad = None
        return time.perf_counter() - started

    with torch.random.fork_rng(devices=[]):  # dropout in the copy draws nothing from the run's random stream
        round_s = step(False) + step(True)  # the warm-up, which also says how many rounds the budget holds
        rounds = max(1, min(rounds, int(budget_s // round_s)))
        timing = time_interleaved({"fp32": lambda: step(False), "bf16": lambda: step(True)}, rounds=rounds, repeats=1,
                                  warmup=0)
    fp32_ms, bf16_ms = timing["fp32"].median_ms, timing["bf16"].median_ms
    first = first_tensor(inputs)
    return {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms, "ratio": bf16_ms / fp32_ms, "rounds": rounds,
            "batch_shape": list(first.shape) if first is not None else None}


def check_precision(precision: Any, name: str = "trainer.precision") -> str:
    """``precision`` as a string, or a ``ConfigError`` naming the option, the value and the choices."""
    value = str(precision)
    if value not in PRECISIONS:
        raise ConfigError(f"{name}={precision!r} is not supported; choices: {list(PRECISIONS)}.{did_you_mean(value, PRECISIONS)}")
    return value


def choose_precision(precision: Any = "auto", accelerator: str = "auto", flags: Mapping[str, Any] | None = None,
                     measure: Callable[[], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Resolve ``precision`` and say why: ``{"requested", "resolved", "facts"}``, for ``auto`` also ``"decided_by"``
    (``"measurement"`` or ``"hardware rule"``) and ``"measured"`` when it measured.

    Args:
        precision: ``trainer.precision`` (one of :data:`PRECISIONS`; Lightning's integer forms too).
        accelerator: the Trainer's ``accelerator``; ``"auto"`` means CUDA when available.
        flags: CPU flags to decide from (default: this machine's).
        measure: for ``"auto"`` on a CPU with bf16 hardware: a call returning at least ``ratio`` (bf16 / fp32 step
            time), usually ``lambda: measure_bf16(model, inputs)``. Without it the hardware rule decides. A
            measurement that fails (a model autocast cannot run) is logged and float32 chosen.

    Raises:
        ConfigError: ``precision`` is not a known value.
    """
    value = check_precision(precision)
    facts = precision_facts(accelerator, flags)
    decision: dict[str, Any] = {"requested": value, "resolved": value, "facts": facts}
    if value != "auto":
        return decision
    decision["decided_by"] = "hardware rule"
    if facts["device"] == "cuda":
        chosen = "bf16-mixed" if facts["cuda_bf16"] else "16-mixed"
    elif facts["device"] == "cpu" and measure is not None and any(facts[f] for f in _BF16_CPU_FLAGS):
        try:
            measured = dict(measure())
        except Exception as err:  # noqa: BLE001 - any model: a failed probe must not stop the run
            measured = {"error": f"{type(err).__name__}: {err}"}
            log.warning("precision=auto: the bf16 measurement failed (%s); training in float32", measured["error"])
        decision["measured"], decision["decided_by"] = measured, "measurement"
        chosen = "bf16-mixed" if float(measured.get("ratio", float("inf"))) <= BF16_MIN_SPEEDUP else "32-true"
    elif facts["device"] == "cpu" and any(facts[f] for f in _BF16_FAST_CPU_FLAGS):
        chosen = "bf16-mixed"
    else:
        chosen = "32-true"
    decision["resolved"] = chosen
    why = decision.get("measured")
    if why and "ratio" in why:
        times = f" ({why['bf16_ms']:.0f} vs {why['fp32_ms']:.0f} ms)" if {"bf16_ms", "fp32_ms"} <= set(why) else ""
        log.info("precision=auto resolved to %r: a bf16-autocast training step measured %.2fx the float32 one%s, "
                 "batch %s; bf16 needs <= %.2fx (%s)", chosen, float(why["ratio"]), times, why.get("batch_shape"),
                 BF16_MIN_SPEEDUP, facts)
    else:
        log.info("precision=auto resolved to %r (%s)", chosen, facts)
    return decision


def resolve_precision(precision: Any = "auto", accelerator: str = "auto",
                      flags: Mapping[str, Any] | None = None,
                      measure: Callable[[], Mapping[str, Any]] | None = None) -> str:
    """``precision`` as a Lightning value: ``"auto"`` becomes what makes training fastest here.

    Args:
        precision: ``trainer.precision`` (one of :data:`PRECISIONS`; Lightning's integer forms too).
        accelerator: the Trainer's ``accelerator``; ``"auto"`` means CUDA when available.
        flags: CPU flags to decide from (default: this machine's).
        measure: see :func:`choose_precision` (e.g. ``lambda: measure_bf16(net, batch_inputs)``).

    Returns:
        The value to give ``lightning.Trainer(precision=...)`` (values other than ``"auto"`` unchanged, as strings).

    Raises:
        ConfigError: ``precision`` is not a known value.
    """
    return choose_precision(precision, accelerator, flags, measure)["resolved"]


def is_mixed(precision: Any) -> bool:
    """Whether a Trainer ``precision`` value computes in less than float32 (``"bf16-mixed"``, ``"16-true"``, ...)."""
    return precision not in FLOAT32_PRECISIONS
