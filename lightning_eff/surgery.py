"""Surgery layer: finding, naming and replacing the submodules a technique operates on.

Why a module of its own: pruning, quantization, distillation, weight-only quantization and the
wrappers of the next techniques (``torch.compile``, activation checkpointing, DDP) all select
submodules by name or type and swap them. One selector (:class:`ModuleSelector`: names, regexes,
types, minimum size, with a :class:`~lightning_eff.errors.NoEffectWarning` when nothing matches),
one get/set/replace and one :func:`canonical_name` live here, just above the floor, so no
technique grows its own.

Example:
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 2))
    >>> [name for name, _ in ModuleSelector(types=["Conv2d", "Linear"], min_params=20).select(net)]
    ['0']
    >>> canonical_name("module._orig_mod.0._checkpoint_wrapped_module.weight")
    '0.weight'
    >>> replace_modules(net, ModuleSelector(types=["ReLU"]), lambda name, m: nn.GELU())
    ['1']
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.batch import call_with_inputs
from lightning_eff.errors import ConfigError, NoEffectWarning
from lightning_eff.naming import WRAPPER_PREFIXES, canonical_name, unwrap_model
from lightning_eff.validation import as_list, check_int

__all__ = ["ModuleSelector", "canonical_name", "unwrap_model", "WRAPPER_PREFIXES", "get_submodule",
           "check_submodule", "set_submodule", "canonical_modules", "type_matches", "check_patterns", "replace_modules", "submodule_inputs"]


def canonical_modules(net: nn.Module) -> dict[str, nn.Module]:
    """``{canonical name: module}``; where a wrapper and its inner module share a name, the outermost (the wrapper).

    Hooks on the outermost module fire once per forward (an activation-checkpoint wrapper's inner module
    runs again during the backward recomputation).
    """
    out: dict[str, nn.Module] = {}
    for name, module in net.named_modules():
        out.setdefault(canonical_name(name), module)
    return out


def get_submodule(net: nn.Module, path: str, option: str = "submodule") -> nn.Module:
    """``net.<path>`` (dotted; the plain network's name also works on a wrapped one), or a ConfigError
    naming the option and the submodules that exist."""
    try:
        return net.get_submodule(path)
    except AttributeError:
        found = canonical_modules(net).get(canonical_name(path))
        if found is not None:
            return found
        names = [n for n, _ in net.named_modules() if n and n.count(".") < 2][:20]
        raise ConfigError(f"{option}={path!r}: {type(net).__name__} has no submodule of that name; it has {names}.") from None


def check_submodule(submodule: Any, option: str = "submodule") -> str | None:
    """A dotted submodule name or ``None``; anything else is a ConfigError naming the option."""
    if submodule is not None and (not isinstance(submodule, str) or not submodule):
        raise ConfigError(f"{option}={submodule!r} must be a dotted submodule name (e.g. 'encoder') or null.")
    return submodule


def set_submodule(net: nn.Module, path: str, module: nn.Module, option: str = "submodule") -> None:
    """Replace ``net.<path>`` (dotted) by ``module``."""
    get_submodule(net, path, option)
    parent, _, name = path.rpartition(".")
    try:
        holder = net.get_submodule(parent) if parent else net
        getattr(holder, name)
    except AttributeError:  # a plain-network name on a wrapped network: replace inside the wrapper
        holder = unwrap_model(get_submodule(net, parent, option)) if parent else unwrap_model(net)
    setattr(holder, name, module)


class _Captured(Exception):
    pass


@torch.no_grad()
def submodule_inputs(net: nn.Module, path: str, inputs: Any, option: str = "submodule") -> tuple:
    """The positional arguments ``net.<path>`` receives when ``net`` runs on ``inputs``.

    How a submodule is traced for quantization when the whole network cannot be (the projection
    models hash raw strings in Python before their tensor-only ``encoder``). ``net`` runs in eval
    mode up to the submodule's call only (a forward pre-hook records the arguments and stops it),
    and every module's train/eval mode is restored afterwards.

    Raises:
        ConfigError: the submodule does not exist, is never called, or is called with keyword arguments.
    """
    inner = get_submodule(net, path, option)
    captured: list[tuple] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs:
            raise ConfigError(f"{option}={path!r} is called with keyword arguments {sorted(kwargs)}; "
                              "graph-mode quantization traces positional tensor inputs only.")
        captured.append(tuple(a.detach().cpu() if isinstance(a, Tensor) else a for a in args))
        raise _Captured

    modes = {m: m.training for m in net.modules()}
    handle = inner.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        net.eval()
        call_with_inputs(net, inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.training = mode
    if not captured:
        raise ConfigError(f"{option}={path!r}: {type(net).__name__}.forward never called that submodule on the example inputs.")
    return captured[0]


def type_matches(module: nn.Module, types: Sequence[Any] | None) -> bool:
    """True when any class in ``type(module).__mro__`` is named in ``types`` or is one of them (``None`` = any)."""
    if types is None:
        return True
    names = {t for t in types if isinstance(t, str)}
    classes = tuple(t for t in types if isinstance(t, type))
    return isinstance(module, classes) or any(cls.__name__ in names for cls in type(module).__mro__)


def check_patterns(option: str, patterns: Sequence[str] | str | None) -> list[str] | None:
    """Validate a list of regular expressions (a single string is accepted as a one-item list)."""
    if patterns is None:
        return None
    out = []
    for pattern in as_list(option, patterns):
        if not isinstance(pattern, str):
            raise ConfigError(f"{option} entries must be regular expressions (str); got {pattern!r}.")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"{option}: {pattern!r} is not a valid regular expression (regex error: {err}).") from err
        out.append(pattern)
    return out


def _check_types(option: str, types: Any) -> list[Any] | None:
    if types is None:
        return None
    out = [types] if isinstance(types, type) else as_list(option, types)
    for entry in out:
        if not (isinstance(entry, str) or (isinstance(entry, type) and issubclass(entry, nn.Module))):
            raise ConfigError(f"{option} entries must be module class names (e.g. 'Conv2d') or nn.Module classes; got {entry!r}.")
    return out


class ModuleSelector:
    """Which submodules a technique touches: names (regexes), types, minimum size — one selector for all.

    Names are matched on :func:`canonical_name` of each module path, so a selection written for the
    plain network also holds on the network wrapped by ``torch.compile``, checkpoint wrappers or DDP.

    Args:
        include: regexes over module names (``None`` = every module).
        exclude: regexes; a module whose name matches one is skipped.
        types: class names (any base class counts: ``"Conv2d"`` matches QAT's ``ConvBnReLU2d``) or classes;
            ``None`` = any type.
        min_params: skip modules with fewer own parameters (thin layers, depthwise 3x3 kernels).
        match: ``"full"`` (a pattern must match the whole name) or ``"search"`` (anywhere in it).
        option: the option name used in errors and warnings (``"include"``, ``"pruning.include"``, ...).

    Raises:
        ConfigError: an invalid regex, a type entry that is neither a name nor a module class, a bad ``match``.
    """

    def __init__(self, include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
                 types: Sequence[Any] | str | None = None, min_params: int = 0, match: str = "full",
                 option: str = "include") -> None:
        if match not in ("full", "search"):
            raise ConfigError(f"match={match!r} is not supported; choose one of ['full', 'search'].")
        self.option = option
        self.include = check_patterns(option, include)
        self.exclude = check_patterns(option.replace("include", "exclude"), exclude) or []
        self.types = _check_types("module_types" if option == "include" else f"{option}.types", types)
        self.min_params = check_int("min_params", min_params, low=0)
        self.match = match

    def _hit(self, pattern: str, name: str) -> bool:
        return bool(re.fullmatch(pattern, name) if self.match == "full" else re.search(pattern, name))

    def name_selected(self, name: str) -> bool:
        """Whether ``name`` passes the include/exclude patterns."""
        name = canonical_name(name)
        if self.include is not None and not any(self._hit(p, name) for p in self.include):
            return False
        return not any(self._hit(p, name) for p in self.exclude)

    def selects(self, name: str, module: nn.Module) -> bool:
        """Whether ``module`` (at path ``name``) is selected."""
        if not self.name_selected(name) or not type_matches(module, self.types):
            return False
        own = sum(p.numel() for p in module.parameters(recurse=False))
        return own >= self.min_params

    def select(self, model: nn.Module, warn: bool = True) -> Iterator[tuple[str, nn.Module]]:
        """``(name, module)`` of every selected module, in module order.

        Warns:
            NoEffectWarning: an include pattern matches no module name, or nothing is selected.
        """
        chosen = [(n, m) for n, m in model.named_modules() if self.selects(n, m)]
        if warn:
            self.warn_unmatched(model)
            if not chosen:
                warnings.warn(f"{self!r} selects no module of {type(model).__name__}; it has no effect.", NoEffectWarning, stacklevel=2)
        return iter(chosen)

    def warn_unmatched(self, model: nn.Module, what: str = "nothing is selected for it") -> list[str]:
        """Warn (``NoEffectWarning``) for each include pattern that matches no module name; return those patterns."""
        from lightning_eff.errors import did_you_mean

        names = [canonical_name(n) for n, _ in model.named_modules() if n]
        unmatched = [p for p in self.include or [] if not any(self._hit(p, n) for n in names)]
        for pattern in unmatched:
            warnings.warn(f"{self.option} pattern '{pattern}' matches no module; {what}.{did_you_mean(pattern, names)}",
                          NoEffectWarning, stacklevel=3)
        return unmatched

    def __repr__(self) -> str:
        return (f"ModuleSelector(include={self.include}, exclude={self.exclude or None}, types={self.types}, "
                f"min_params={self.min_params}, match={self.match!r})")


def replace_modules(model: nn.Module, selector: ModuleSelector, make: Any) -> list[str]:
    """Replace every module ``selector`` chooses by ``make(name, module)`` (``None`` keeps it); return the names replaced.

    Children are collected before any replacement, so a replacement that wraps its module is not visited again.
    """
    replaced = []
    for name, module in list(selector.select(model, warn=False)):
        if not name:
            continue
        new = make(name, module)
        if new is not None and new is not module:
            set_submodule(model, name, new)
            replaced.append(name)
    return replaced
