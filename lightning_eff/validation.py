"""Small option checkers shared by every callback, datamodule and the CLI.

Each raises :class:`~lightning_eff.errors.ConfigError` naming the option, the value and what is
valid, so a user sees ``amount=1.5`` rejected as ``amount`` rather than a stack trace mid-fit.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from lightning_eff.errors import ConfigError, did_you_mean

__all__ = ["check_choice", "check_number", "check_int", "check_bool"]


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ``ConfigError`` with a did-you-mean."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(
            f"{name}={value!r} is not supported; choose one of {choices}.{did_you_mean(value, choices)}"
        )
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_none: bool = False,
) -> float | None:
    """Check that ``value`` is a real number (not bool, not str) inside ``[low, high]``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} must be a number ({type(value).__name__} given).{_range(low, high, low_inclusive, high_inclusive)}")
    bad_low = low is not None and (value < low if low_inclusive else value <= low)
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high:
        raise ConfigError(f"{name}={value!r} is out of range.{_range(low, high, low_inclusive, high_inclusive)}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None, allow_none: bool = False) -> int | None:
    """Check that ``value`` is an ``int`` (not bool) inside ``[low, high]``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name}={value!r} must be an integer ({type(value).__name__} given).{_range(low, high, True, True)}")
    check_number(name, value, low=low, high=high)
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """Check that ``value`` is a real ``bool`` (``"false"`` is a truthy string, so refuse it)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false ({type(value).__name__} given).")
    return value


def _range(low, high, low_inc, high_inc) -> str:
    if low is None and high is None:
        return ""
    lo = "-inf" if low is None else f"{low}"
    hi = "inf" if high is None else f"{high}"
    return f" Valid range: {'[' if low_inc else '('}{lo}, {hi}{']' if high_inc else ')'}."
