"""The quantized engines: their names, the checks on them, and which engine a model was made for.

Why a module of its own: before, the engine name was checked in half a dozen places and parked on
the model by the FX flow, so export, the report and pruning imported ``fx.py`` only to read it
back. This module owns the engine vocabulary (``x86``, ``fbgemm``, ``qnnpack``, ``onednn``), the
check (a ``ConfigError`` naming the option, the value and the engines this build has), the
per-model bookkeeping (:func:`set_model_engine` / :func:`model_engine`, kept across deep copies of
FX graphs) and running code under an engine (:func:`quantized_engine`). It depends on torch and the
floor only, so every layer above may ask it.

Example:
    >>> net = nn.Linear(2, 2)
    >>> model_engine(net) is None
    True
    >>> set_model_engine(net, "qnnpack"); model_engine(net)
    'qnnpack'
    >>> check_engine("qnnpak")
    Traceback (most recent call last):
    ...
    lightning_eff.errors.ConfigError: engine='qnnpak' is not supported; choose one of ['x86', ...Did you mean 'qnnpack'?
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_eff.errors import ConfigError, did_you_mean

__all__ = ["KNOWN_ENGINES", "ENGINE_ATTR", "supported_engines", "check_engine", "int8_kernels_allowed", "quantized_engine",
           "set_model_engine", "model_engine"]

ENGINE_ATTR = "_lightning_eff_engine"
_WARNED_DETERMINISM = False


KNOWN_ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")


def supported_engines() -> list[str]:
    """The quantized engines this torch build can run, among :data:`KNOWN_ENGINES`."""
    available = set(torch.backends.quantized.supported_engines)
    return [e for e in KNOWN_ENGINES if e in available]


def check_engine(engine: Any, option: str = "engine") -> str:
    """Return ``engine`` if this build supports it, else raise ``ConfigError`` with did-you-mean.

    Raises:
        ConfigError: unknown name (``"qnnpak"``) or an engine this build was compiled without.
    """
    choices = supported_engines()
    if engine not in choices:
        why = "is not available in this torch build" if engine in KNOWN_ENGINES else "is not supported"
        raise ConfigError(
            f"{option}={engine!r} {why}; choose one of {choices} "
            f"(torch.backends.quantized.supported_engines).{did_you_mean(engine, choices)}"
        )
    return engine


@contextlib.contextmanager
def int8_kernels_allowed() -> Iterator[None]:
    """Let int8 CPU kernels run inside the block under ``torch.use_deterministic_algorithms(True)``.

    int8 CPU kernels call ``quantized_resize_``, which torch flags as non-deterministic (CPU int8
    inference is deterministic in practice), and ``Trainer(deterministic=True)`` leaves the global
    flag on after fit — so conversion, export verification and the report would raise. Inside this
    block determinism only warns (once per process, saying so); the caller's setting is restored.
    """
    global _WARNED_DETERMINISM
    strict = torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    if strict:
        if not _WARNED_DETERMINISM:
            warnings.warn("deterministic algorithms are on (Trainer(deterministic=True)); int8 CPU kernels have no "
                          "deterministic flag (quantized_resize_), so it is relaxed to warn-only while int8 models are "
                          "converted, exported, verified and measured, and restored afterwards.", UserWarning, stacklevel=3)
            _WARNED_DETERMINISM = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        if strict:
            torch.use_deterministic_algorithms(True)


@contextlib.contextmanager
def quantized_engine(engine: str | None) -> Iterator[str]:
    """Set ``torch.backends.quantized.engine`` for the block and restore it afterwards.

    Weight packing happens at ``convert``/load time with the engine active then, and the same
    int8 model can give (slightly) different numbers under another engine, so every FX step
    runs inside this context. ``None`` leaves the current engine alone. int8 kernels may run
    under deterministic mode inside it (:func:`int8_kernels_allowed`).
    """
    previous = torch.backends.quantized.engine
    if engine is not None:
        check_engine(engine)
        torch.backends.quantized.engine = engine
    try:
        with int8_kernels_allowed():
            yield previous if engine is None else engine
    finally:
        torch.backends.quantized.engine = previous



def set_model_engine(model: nn.Module, engine: str) -> None:
    """Record on ``model`` the engine it was prepared / converted for (an FX graph keeps it in ``.meta`` too)."""
    setattr(model, ENGINE_ATTR, engine)
    if isinstance(model, torch.fx.GraphModule):  # GraphModule.__deepcopy__ keeps only .meta
        model.meta[ENGINE_ATTR] = engine


def _own_engine(model: nn.Module) -> str | None:
    engine = getattr(model, ENGINE_ATTR, None)
    if engine is None and isinstance(getattr(model, "meta", None), dict):
        engine = model.meta.get(ENGINE_ATTR)
    return engine


def model_engine(model: nn.Module, default: str | None = None) -> str | None:
    """The engine a model was prepared / converted for (``None`` for float models).

    A float network hosting a quantized submodule (e.g. a projection model whose ``encoder`` was
    quantized, see the callbacks' ``submodule`` option) reports its first quantized submodule's engine.
    """
    engine = _own_engine(model)
    if engine is None:
        engine = next((e for m in model.modules() if (e := _own_engine(m)) is not None), None)
    return engine if engine is not None else default

