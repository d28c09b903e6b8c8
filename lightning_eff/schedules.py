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
