"""Which parameters to prune: selection by module name (regex), module type and parameter name.

Selectors are strings, never module objects, so a Hydra config can name them and a model that
was rewritten in between (QAT's FX ``prepare`` copies every module) can be searched again by the
same selectors. Type matching walks the class hierarchy, so ``"Conv2d"`` also matches QAT's fused
``ConvBnReLU2d`` (a ``Conv2d`` subclass) and ``"Linear"`` matches ``torch.ao.nn.qat.Linear``.

Thin layers: the survey (§3.1.1) notes that pruning thin first layers costs accuracy for little
gain; ``skip_first=True`` leaves the first selected layer dense and ``min_params`` skips layers
with fewer parameters (depthwise 3×3 convs hold 9 per channel).

Example:
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    >>> list(select_parameters(net))
    ['0.weight', '3.weight']
    >>> list(select_parameters(net, skip_first=True))
    ['3.weight']
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from torch import nn

from lightning_eff.errors import ConfigError, NoEffectWarning, did_you_mean
from lightning_eff.naming import canonical_name
from lightning_eff.surgery import ModuleSelector, check_patterns, type_matches
from lightning_eff.validation import check_bool, check_int

__all__ = ["DEFAULT_MODULE_TYPES", "select_parameters", "prunable_parameters", "type_matches", "get_parameter", "check_patterns"]

DEFAULT_MODULE_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")



def prunable_parameters(module: nn.Module) -> list[str]:
    """The module's own parameters that exist (not ``None``) and have at least one element."""
    return [name for name, p in module.named_parameters(recurse=False) if p is not None and p.numel() > 0]



def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """``model``'s parameter ``"<module path>.<param>"``, with an error that lists what exists.

    Raises:
        ConfigError: the module path does not exist, or the module has no such parameter (e.g.
            ``ReLU.weight`` or the bias of a ``Linear(bias=False)``), naming the module path, its
            type and its prunable parameters.
    """
    module_path, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError as err:
        modules = [n for n, _ in model.named_modules() if n]
        raise ConfigError(f"parameter {name!r}: no module {module_path!r} in {type(model).__name__}.{did_you_mean(module_path, modules)}") from err
    param = getattr(module, attr, None)
    if not isinstance(param, nn.Parameter):
        raise ConfigError(
            f"cannot prune {name!r}: module {module_path or '<root>'!r} ({type(module).__name__}) has no parameter {attr!r}; "
            f"its prunable parameters are {prunable_parameters(module)}."
        )
    return param


def select_parameters(
    model: nn.Module,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    module_types: Sequence[str] | None = DEFAULT_MODULE_TYPES,
    parameter_names: Sequence[str] = ("weight",),
    min_params: int = 0,
    skip_first: bool = False,
) -> dict[str, nn.Parameter]:
    """Select parameters to prune, in module order, keyed by their full name.

    Args:
        model: the network.
        include: regexes fully matched against module qualified names (``None`` = every module).
        exclude: regexes; a module whose name fully matches one is skipped.
        module_types: class names (any base class counts); ``None`` = any type.
        parameter_names: parameter attributes to take from each matched module.
        min_params: skip parameters with fewer elements (thin layers).
        skip_first: leave the first selected module dense (the survey: thin first layers hurt).

    Returns:
        ``{"<module path>.<param>": parameter}`` (shared parameters once).

    Raises:
        ConfigError: an include pattern matches modules of the right type, none of which has a
            requested parameter (``ReLU.weight``, ``Linear(bias=False).bias``): the error names the
            modules and the parameters they do have.

    Warns:
        NoEffectWarning: an include pattern matches no module, or nothing at all is selected.
    """
    selector = ModuleSelector(include=include, exclude=exclude, types=module_types)  # names and types: the shared selector
    include = selector.include
    check_int("min_params", min_params, low=0)  # per parameter here (ModuleSelector's counts a module's own parameters)
    check_bool("skip_first", skip_first)
    if isinstance(parameter_names, str):
        parameter_names = [parameter_names]
    modules = dict(model.named_modules())
    hits: dict[str, list[str]] = {p: [] for p in include or []}
    selected: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    first_done = False
    for name, module in modules.items():
        if not selector.name_selected(name):  # canonical names: the plain network's names under any wrapper
            continue
        cname = canonical_name(name)
        for pattern in include or []:
            if re.fullmatch(pattern, cname):
                hits[pattern].append(name)
        if not type_matches(module, selector.types):
            continue
        taken = False
        for attr in parameter_names:
            param = getattr(module, attr, None)
            if not isinstance(param, nn.Parameter) or id(param) in seen or param.numel() < min_params:
                continue
            taken = True
            if skip_first and not first_done:
                continue
            seen.add(id(param))
            selected[f"{name}.{attr}" if name else attr] = param
        first_done = first_done or taken
    for pattern, names in hits.items():
        if not names:
            choices = [canonical_name(n) for n in modules if n]
            warnings.warn(
                f"include pattern '{pattern}' matches no module; nothing is pruned for it.{did_you_mean(pattern, choices)}",
                NoEffectWarning,
                stacklevel=2,
            )
            continue
        usable = [n for n in names if type_matches(modules[n], module_types)
                  and any(isinstance(getattr(modules[n], a, None), nn.Parameter) for a in parameter_names)]
        if not usable:
            shown = ", ".join(f"{n!r} ({type(modules[n]).__name__}, prunable parameters {prunable_parameters(modules[n])})" for n in names[:5])
            raise ConfigError(
                f"include pattern '{pattern}' matches only modules that cannot be pruned with parameter_names="
                f"{list(parameter_names)} and module_types={list(module_types) if module_types else None}: {shown}. "
                "Name a module that has the parameter, or change parameter_names / module_types."
            )
    if not selected:
        warnings.warn(
            f"no parameter selected (include={include}, exclude={selector.exclude or None}, module_types={module_types}, "
            f"parameter_names={list(parameter_names)}, min_params={min_params}); pruning has no effect.",
            NoEffectWarning,
            stacklevel=2,
        )
    return selected
