"""The exporter registry: one entry per back end, looked up by format name or file suffix.

Why a registry: the ``Export`` callback, ``load_artifact`` and the report used to branch on the
format string; adding a back end meant editing each branch. A back end module (``torchscript``,
``lite``, ``executorch``, ``onnx``) now registers one :class:`Exporter` saying what it writes,
which models it does not take (and why), which engine it records, how it loads its files back and
where it keeps its metadata. A new back end is one new module that calls :func:`register_exporter`.

Example:
    >>> import lightning_eff.export  # registers the built-in back ends
    >>> formats()
    ['pt', 'ptl', 'pte', 'onnx']
    >>> get_exporter("ptl").kind
    'lite'
    >>> get_exporter("tflite")
    Traceback (most recent call last):
    ...
    lightning_eff.errors.ConfigError: formats[]='tflite' is not supported; choose one of ['pt', 'ptl', 'pte', 'onnx'].
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_eff.errors import ConfigError, did_you_mean

__all__ = ["Exporter", "register_exporter", "get_exporter", "exporter_for_path", "formats"]


def _takes_everything(model: Any, int8: bool, pt2e: bool) -> str | None:
    return None


def _no_engine(model: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Exporter:
    """One back end.

    Attributes:
        format: the format name users write (``formats=["pt"]``) and the file suffix without the dot.
        kind: what :class:`~lightning_eff.export.Artifact` reports (``"torchscript"``, ``"lite"``, ...).
        export: ``export(model, example_inputs, path, **options) -> Path`` (atomic, writes metadata).
        load: ``load(path, engine) -> callable``: the runtime object that runs the file.
        read_metadata: ``read_metadata(path) -> dict``: the ``lightning_eff.json`` it carries.
        skip_reason: ``skip_reason(model, int8, pt2e_int8) -> str | None``: why this back end does not take
            ``model`` (``None`` when it does); the caller logs the reason and moves on.
        engine: ``engine(model) -> str | None``: the quantized engine the file will run on.
        options: the keyword options ``export`` accepts beyond model, inputs and path (``method``, ``int8``, ...).
    """

    format: str
    kind: str
    export: Callable[..., Path]
    load: Callable[[Path, str | None], Any]
    read_metadata: Callable[[Path], dict]
    skip_reason: Callable[[Any, bool, bool], str | None] = _takes_everything
    engine: Callable[[Any], str | None] = _no_engine
    options: frozenset[str] = field(default_factory=frozenset)
    order: int = 100  #: position in :func:`formats` (built-ins 10..40), then registration order

    @property
    def suffix(self) -> str:
        """``"." + format``."""
        return f".{self.format}"

    def write(self, model: Any, example_inputs: Any, path: str | os.PathLike, **options: Any) -> Path:
        """Call :attr:`export` with the options this back end accepts (others are dropped)."""
        return self.export(model, example_inputs, path, **{k: v for k, v in options.items() if k in self.options})


_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter) -> Exporter:
    """Add (or replace) the back end for ``exporter.format``; returns it."""
    _EXPORTERS[exporter.format] = exporter
    return exporter


def formats() -> list[str]:
    """Registered format names: the built-ins (``pt``, ``ptl``, ``pte``, ``onnx``) first, then others as registered."""
    return [e.format for e in sorted(_EXPORTERS.values(), key=lambda e: e.order)]


def get_exporter(fmt: str, option: str = "formats[]") -> Exporter:
    """The back end for format ``fmt``.

    Raises:
        ConfigError: no such format (names the option, the value and the registered formats).
    """
    if fmt not in _EXPORTERS:
        raise ConfigError(f"{option}={fmt!r} is not supported; choose one of {formats()}.{did_you_mean(str(fmt), formats())}")
    return _EXPORTERS[fmt]


def exporter_for_path(path: str | os.PathLike) -> Exporter:
    """The back end that wrote ``path`` (by suffix).

    Raises:
        ConfigError: an unknown suffix.
    """
    suffix = Path(path).suffix.lower()
    return get_exporter(suffix.lstrip("."), option="artifact suffix")
