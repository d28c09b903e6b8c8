"""Named protocols between the techniques and the things that ship their results.

:class:`Deployable` is what a callback offers to ``Export`` and to the footprint report: the
models it produced (``{"int8_x86": module, ...}``), the files it wrote itself, and whether its
models should be re-exported (weight-only packed codes are their own artifact: re-exporting the
dequantized float model would only write fp32 bytes again). Before, ``Export`` and the report
relied on this by unnamed duck typing; every lightning_eff callback now implements it through
:class:`~lightning_eff.callbacks.base.EffCallback`, and a user's own callback can too.

Part of the floor: it depends on torch only, so the report (below the callbacks) and the
callbacks share one definition.

Example:
    >>> from torch import nn
    >>> class Mine:
    ...     exportable = True
    ...     def deployable_models(self): return {"mine": nn.Linear(2, 2)}
    ...     def artifacts(self): return []
    >>> isinstance(Mine(), Deployable), sorted(offered_models([Mine(), object()]))
    (True, ['mine'])
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from torch import nn

__all__ = ["Deployable", "deployables", "offered_models"]


@runtime_checkable
class Deployable(Protocol):
    """What a callback offers to ``Export`` and the report.

    Attributes:
        exportable: ``False`` when the callback's own files are the artifact (``Export`` and the
            variant rows of the report leave its models alone).
    """

    exportable: bool

    def deployable_models(self) -> dict[str, nn.Module]:
        """``{variant name: model}`` this callback produced (empty before it ran)."""

    def artifacts(self) -> list[dict[str, Any]]:
        """One entry per file this callback wrote (``path``, ``bytes``, ... or ``error``)."""


def deployables(callbacks: Iterable[Any], skip: Any = None, exportable_only: bool = False) -> list[Any]:
    """The callbacks that offer models: :class:`Deployable` ones, and any object with a callable
    ``deployable_models`` (older duck-typed callbacks), except ``skip``."""
    out = []
    for cb in callbacks:
        if cb is skip or not callable(getattr(cb, "deployable_models", None)):
            continue
        if exportable_only and not getattr(cb, "exportable", True):
            continue
        out.append(cb)
    return out


def offered_models(callbacks: Iterable[Any], skip: Any = None, exportable_only: bool = False) -> dict[str, nn.Module]:
    """Merge the ``deployable_models()`` of :func:`deployables` (later callbacks win on name clashes)."""
    models: dict[str, nn.Module] = {}
    for cb in deployables(callbacks, skip, exportable_only):
        models.update(cb.deployable_models())
    return models
