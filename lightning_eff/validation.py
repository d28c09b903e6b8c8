"""Small option checkers shared by every callback, datamodule and the CLI.

Each raises :class:`~lightning_eff.errors.ConfigError` naming the option, the value and what is
valid, so a user sees ``amount=1.5`` rejected as ``amount`` rather than a stack trace mid-fit.
"""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from lightning_eff.errors import ConfigError, did_you_mean

__all__ = ["check_choice", "check_number", "check_int", "check_bool", "as_list", "build_node", "renamed_option"]


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


def as_list(name: str, value: Any, *, item: type | tuple[type, ...] | None = None, allow_none: bool = False,
            allow_empty: bool = True) -> list | None:
    """A list-valued option as a ``list``: a single string (or number) is **one item**, never its characters.

    ``formats="pt"`` means ``["pt"]``; tuples and Hydra's ``ListConfig`` become lists. A mapping or
    any other non-sequence is a :class:`ConfigError` saying a list is expected; with ``item`` each
    element's type is checked too (bools are not ints).
    """
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name}=None: a list is expected (e.g. {name}=[...]).")
    scalar_types = (str, bytes, numbers.Number)
    if isinstance(value, scalar_types):
        items = [value]
    elif isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise ConfigError(f"{name}={value!r} must be a list ({type(value).__name__} given), e.g. {name}=[...].")
    else:
        items = list(value)
    if not items and not allow_empty:
        raise ConfigError(f"{name}=[] must name at least one item.")
    if item is not None:
        for v in items:
            if isinstance(v, bool) and bool not in (item if isinstance(item, tuple) else (item,)) or not isinstance(v, item):
                want = item.__name__ if isinstance(item, type) else "/".join(t.__name__ for t in item)
                raise ConfigError(f"{name}: item {v!r} must be a {want} ({type(v).__name__} given).")
    return items


def renamed_option(name: str, value: Any, who: str, stacklevel: int = 3, **old_names: Any) -> Any:
    """An option also accepted under its older name(s): the value given (``None`` = not given).

    The one vocabulary every technique shares (``output_dir``; ``include``/``exclude``/``module_types``/
    ``min_params`` for module selection) keeps the old spellings working for a while, with a
    ``FutureWarning`` that says the new name.

    Raises:
        ConfigError: the option given under both names.
    """
    given = {k: v for k, v in old_names.items() if v is not None}
    if not given:
        return value
    old, old_value = next(iter(given.items()))
    if value is not None or len(given) > 1:
        both = {name: value, **given} if value is not None else given
        raise ConfigError(f"{who}: give {name} only (got {', '.join(f'{k}={v!r}' for k, v in both.items())}).")
    warnings.warn(f"{who}({old}=...) is renamed {name}=...; {old} will be removed.", FutureWarning, stacklevel=stacklevel)
    return old_value


def build_node(node: Any, name: str) -> Any:
    """An option that holds an object: a ``{_target_: dotted.path, **kwargs}`` mapping is built (its nested
    ``_target_`` nodes first), a list is built item by item, anything else is returned as given.

    Why here: datamodules and tasks receive plain dicts from the CLI (``OmegaConf.to_container``) and
    objects from Python users; one function turns either into the object, with errors naming the option.

    Example:
        >>> build_node({"_target_": "fractions.Fraction", "numerator": 3, "denominator": 4}, "x")
        Fraction(3, 4)

    Raises:
        ConfigError: the ``_target_`` cannot be imported or refuses its arguments.
    """
    import importlib

    if isinstance(node, Mapping) and "_target_" in node:
        kwargs = {k: build_node(v, f"{name}.{k}") for k, v in node.items() if k != "_target_"}
        module_name, _, attr = str(node["_target_"]).rpartition(".")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ConfigError(f"{name}._target_={node['_target_']!r} cannot be imported: {err}") from err
        try:
            return target(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from err
        except TypeError as err:
            raise ConfigError(f"{name}: {node['_target_']} refused its options {sorted(kwargs)}: {err}") from err
    if isinstance(node, (list, tuple)):
        return [build_node(v, f"{name}[{i}]") for i, v in enumerate(node)]
    return node


def _range(low, high, low_inc, high_inc) -> str:
    if low is None and high is None:
        return ""
    lo = "-inf" if low is None else f"{low}"
    hi = "inf" if high is None else f"{high}"
    return f" Valid range: {'[' if low_inc else '('}{lo}, {hi}{']' if high_inc else ')'}."
