"""Step-level schedules shared by every technique: pure functions of the global step.

Because a schedule is a function of ``global_step`` (and the run's total steps), nothing about
it needs saving: a run resumed with ``fit(ckpt_path=...)`` recomputes exactly the same values.

Example:
    >>> resolve_step(step=None, fraction=0.25, total_steps=1000)
    250
    >>> phase(step=300, start=250, end=None)
    True
"""
from __future__ import annotations

import math

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_int, check_number

__all__ = ["resolve_step", "phase", "check_step_or_fraction"]


def check_step_or_fraction(name: str, step: int | None, fraction: float | None) -> None:
    """Validate a ``<name>_step`` / ``<name>_fraction`` pair: at most one set, in range."""
    check_int(f"{name}_step", step, low=0, allow_none=True)
    check_number(f"{name}_fraction", fraction, low=0.0, high=1.0, allow_none=True)
    if step is not None and fraction is not None:
        raise ConfigError(f"set either {name}_step={step} or {name}_fraction={fraction}, not both.")


def resolve_step(step: int | None, fraction: float | None, total_steps: int | float | None) -> int | None:
    """The global step at which something happens: ``step`` itself, or ``fraction`` of ``total_steps``.

    Returns ``None`` when neither is set (the event never happens). With a fraction and an
    unknown/infinite total (``max_epochs=-1``), raises ``ConfigError`` asking for a step instead.
    """
    if step is not None:
        return int(step)
    if fraction is None:
        return None
    if total_steps is None or not math.isfinite(float(total_steps)):
        raise ConfigError(f"a fraction of training ({fraction}) needs a finite number of steps; give the step instead.")
    return int(round(float(fraction) * float(total_steps)))


def phase(step: int, start: int | None, end: int | None = None) -> bool:
    """True when ``start <= step < end`` (``start=None`` means never, ``end=None`` means forever)."""
    if start is None:
        return False
    return step >= start and (end is None or step < end)


# --------------------------------------------------------------------------------------------
# Sparsity schedules (pruning). Each is a pure function of the global step, so a resumed run
# recomputes the same target; only the masks (which depend on the weights) are saved.
# --------------------------------------------------------------------------------------------
__all__ += ["check_sparsity", "constant_sparsity", "polynomial_decay", "rounds_sparsity", "check_sparsity_schedule"]


def check_sparsity(name: str, value: float, allow_full: bool = False) -> float:
    """A sparsity target: a real number in ``[0, 1)`` (``[0, 1]`` with ``allow_full=True``).

    Sparsity 1.0 removes every weight of a layer (a dead network), so it is refused unless asked.

    Raises:
        ConfigError: not a number (``"0.5"`` is a string), outside the range, or 1.0 without ``allow_full``.
    """
    check_number(name, value, low=0.0, high=1.0)
    if value == 1.0 and not allow_full:
        raise ConfigError(
            f"{name}={value!r} would prune every weight (dead layers); use a value below 1.0, "
            "or pass allow_full=True if that is really intended."
        )
    return float(value)


def constant_sparsity(step: int, sparsity: float, begin_step: int = 0, end_step: int | None = None) -> float:
    """``sparsity`` inside ``[begin_step, end_step)``, 0 before (after ``end_step`` the masks stay)."""
    if step < begin_step:
        return 0.0
    return float(sparsity)


def polynomial_decay(
    step: int,
    initial_sparsity: float,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    power: float = 3.0,
    frequency: int = 1,
    allow_full: bool = False,
) -> float:
    """Gradual pruning schedule of Zhu & Gupta (2017), TF-MOT's ``PolynomialDecay``.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0)) ** power`` for
    ``t_0 <= t <= t_end``, where ``t`` is rounded down to a multiple of ``frequency`` after
    ``t_0`` (masks only change every ``frequency`` steps); ``0`` before ``t_0`` and ``s_f`` after
    ``t_end``. Pruning fast early, while redundancy is high, and slowly near the target.

    Args:
        step: global step.
        initial_sparsity: ``s_i`` at ``begin_step``.
        final_sparsity: ``s_f`` reached at ``end_step``.
        begin_step: ``t_0``.
        end_step: ``t_end`` (> ``begin_step``).
        power: exponent (3 in the paper).
        frequency: steps between mask updates.
        allow_full: accept ``final_sparsity=1.0``.

    Raises:
        ConfigError: a sparsity outside ``[0, 1)``, a decreasing schedule (``final < initial``),
            ``end_step <= begin_step``, ``power <= 0`` or ``frequency < 1``.
    """
    check_sparsity("initial_sparsity", initial_sparsity, allow_full)
    check_sparsity("final_sparsity", final_sparsity, allow_full)
    if final_sparsity < initial_sparsity:
        raise ConfigError(
            f"decreasing schedule: final_sparsity={final_sparsity} < initial_sparsity={initial_sparsity} "
            f"(at end_step={end_step} the sparsity would go down); pruned weights cannot come back."
        )
    check_int("begin_step", begin_step, low=0)
    check_int("end_step", end_step, low=begin_step + 1)
    check_number("power", power, low=0.0, low_inclusive=False)
    check_int("frequency", frequency, low=1)
    if step < begin_step:
        return 0.0
    t = min(step, end_step)
    if t < end_step:
        t = begin_step + ((t - begin_step) // frequency) * frequency
    progress = (t - begin_step) / (end_step - begin_step)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power)


def rounds_sparsity(step: int, final_sparsity: float, rounds: int, begin_step: int, end_step: int, allow_full: bool = False) -> float:
    """The survey's Algorithm 1: ``rounds`` rounds of prune-then-fine-tune between begin and end.

    Round ``r`` (``r = 1..rounds``) starts at ``begin_step + (r - 1) * (end_step - begin_step) / rounds``
    and prunes the same fraction ``p`` of the weights that are still alive, so after ``r`` rounds
    the sparsity is ``1 - (1 - s_f) ** (r / rounds)`` (iterative magnitude pruning as in Han et
    al. 2015 and Frankle & Carbin 2019); the steps until the next round fine-tune.

    Raises:
        ConfigError: bad sparsity, ``rounds < 1`` or ``end_step <= begin_step``.
    """
    check_sparsity("final_sparsity", final_sparsity, allow_full)
    check_int("rounds", rounds, low=1)
    check_int("begin_step", begin_step, low=0)
    check_int("end_step", end_step, low=begin_step + 1)
    if step < begin_step:
        return 0.0
    span = (end_step - begin_step) / rounds
    done = min(rounds, int((step - begin_step) // span) + 1)
    if final_sparsity == 1.0 and done == rounds:
        return 1.0
    return float(1.0 - (1.0 - final_sparsity) ** (done / rounds))


def check_sparsity_schedule(steps: list[int], values: list[float], allow_full: bool = False) -> list[tuple[int, float]]:
    """Validate an explicit schedule ``{steps[i]: values[i]}``: increasing steps, non-decreasing values in [0, 1).

    Raises:
        ConfigError: lengths differ, a step out of order, or a value that decreases or exceeds
            the range, naming the offending step.
    """
    if len(steps) != len(values) or not steps:
        raise ConfigError(f"schedule steps {steps} and sparsities {values} must be non-empty lists of equal length.")
    pairs: list[tuple[int, float]] = []
    for step, value in zip(steps, values):
        check_int("schedule step", step, low=0)
        try:
            check_sparsity(f"sparsity at step {step}", value, allow_full)
        except ConfigError as err:
            raise ConfigError(f"schedule: {err}") from err
        if pairs and step <= pairs[-1][0]:
            raise ConfigError(f"schedule: step {step} comes after step {pairs[-1][0]}; steps must increase.")
        if pairs and value < pairs[-1][1]:
            raise ConfigError(
                f"schedule decreases at step {step}: {value} < {pairs[-1][1]} (step {pairs[-1][0]}); "
                "a sparsity schedule must be non-decreasing."
            )
        pairs.append((int(step), float(value)))
    return pairs


# --------------------------------------------------------------------------------------------
# Scalar hyper-parameter schedules (distillation temperature and loss weights, ...).
# --------------------------------------------------------------------------------------------
__all__ += ["ScheduledValue"]

_SCHEDULE_KEYS = ("start", "end", "begin_step", "begin_fraction", "end_step", "end_fraction", "power")


class ScheduledValue:
    """A number, or a polynomial ramp ``start -> end`` between two steps, as a function of the global step.

    ``value(t) = end + (start - end) * (1 - p) ** power`` with ``p`` the clipped progress between
    ``begin`` and ``end`` (steps, or fractions of the run's total steps): ``start`` before, ``end``
    after. Every value the schedule can take is validated by ``check(name, value)`` up front.

    Args:
        name: option name used in error messages.
        spec: a number, or ``{"start", "end", "begin_step"|"begin_fraction", "end_step"|"end_fraction", "power"}``.
        check: validator returning the (converted) value; raises ``ConfigError``.

    Example:
        >>> t = ScheduledValue("temperature", {"start": 8.0, "end": 2.0, "end_fraction": 1.0}, lambda n, v: float(v))
        >>> t(0, 100), t(50, 100), t(100, 100)
        (8.0, 5.0, 2.0)
    """

    def __init__(self, name: str, spec, check) -> None:
        self.name = name
        if isinstance(spec, dict) or hasattr(spec, "keys"):
            spec = dict(spec)
            unknown = sorted(set(spec) - set(_SCHEDULE_KEYS))
            if unknown or "start" not in spec or "end" not in spec:
                raise ConfigError(f"{name}={spec!r}: a schedule needs 'start' and 'end' and may have {list(_SCHEDULE_KEYS)}"
                                  f"{'; unknown ' + str(unknown) if unknown else ''}.")
            self.start = check(f"{name}.start", spec["start"])
            self.end = check(f"{name}.end", spec["end"])
            check_step_or_fraction(f"{name}.begin", spec.get("begin_step"), spec.get("begin_fraction"))
            check_step_or_fraction(f"{name}.end", spec.get("end_step"), spec.get("end_fraction"))
            self.begin = (spec.get("begin_step"), spec.get("begin_fraction", None if "begin_step" in spec else 0.0))
            self.finish = (spec.get("end_step"), spec.get("end_fraction", None if "end_step" in spec else 1.0))
            self.power = check_number(f"{name}.power", spec.get("power", 1.0), low=0.0, low_inclusive=False)
            self.constant = False
        else:
            self.start = self.end = check(name, spec)
            self.constant = True

    def __call__(self, step: int, total_steps: float | None = None) -> float:
        if self.constant:
            return self.start
        begin = resolve_step(*self.begin, total_steps) or 0
        end = resolve_step(*self.finish, total_steps)
        if end is None or end <= begin:
            return self.end if step >= begin else self.start
        p = min(max((step - begin) / (end - begin), 0.0), 1.0)
        return float(self.end + (self.start - self.end) * (1.0 - p) ** self.power)
