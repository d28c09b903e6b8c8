"""The project's exception and warning types, in one place.

Every bad option is a :class:`ConfigError` (a ``ValueError``) whose message names the option,
the value it got, the valid choices and, where possible, a did-you-mean hint. Callers may catch
``ValueError`` and still get ours.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = ["ConfigError", "NoEffectWarning", "ExportUnavailableError", "DataNotFoundError", "did_you_mean"]


class ConfigError(ValueError):
    """An option has a value that cannot work. The message names option, value and choices."""


class NoEffectWarning(UserWarning):
    """A technique was configured but changes nothing (e.g. a selector that matches no module)."""


class ExportUnavailableError(RuntimeError):
    """An export path is not available in this build; the message says what is missing and what to use instead."""


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message gives the install command and the option to set."""


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""`` when nothing is close."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
