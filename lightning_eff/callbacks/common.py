"""Helpers every callback shares: which attribute of the LightningModule is the network, real example inputs.

Batch conventions live in :mod:`lightning_eff.batch`, submodule surgery in :mod:`lightning_eff.surgery`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_eff.batch import model_inputs, resize_batch, to_cpu
from lightning_eff.errors import ConfigError, did_you_mean

__all__ = ["DEFAULT_MODULE_ATTR", "module_attributes", "check_module_attr", "target_module", "set_target_module", "example_inputs"]

log = logging.getLogger(__name__)


DEFAULT_MODULE_ATTR = "model"


def module_attributes(pl_module: nn.Module) -> list[str]:
    """Names of the attributes of ``pl_module`` that hold an ``nn.Module`` (its direct children)."""
    return [n for n, _ in pl_module.named_children()]


def check_module_attr(module_attr: Any, option: str = "module_attr") -> str | None:
    """A (dotted) attribute name or ``None`` (the LightningModule itself); anything else is a ConfigError."""
    if module_attr is not None and (not isinstance(module_attr, str) or not module_attr):
        raise ConfigError(f"{option}={module_attr!r} must name the attribute holding the network (e.g. 'model'), "
                          "or be null for the LightningModule itself.")
    return module_attr


def target_module(pl_module: nn.Module, attr: str | None = DEFAULT_MODULE_ATTR, who: str | None = None) -> nn.Module:
    """The network a technique operates on: ``pl_module.<attr>`` (dotted paths allowed).

    ``attr=None`` is the LightningModule itself. The default ``"model"`` falls back to the
    LightningModule when it has no such attribute (a module that *is* its network). Any other name
    that does not hold an ``nn.Module`` is a :class:`ConfigError` naming the attributes that do,
    with a did-you-mean — a typo such as ``module_attr="nett"`` must never silently select the
    whole LightningModule (or nothing).
    """
    if not attr:
        return pl_module
    try:
        model = pl_module.get_submodule(attr)
    except AttributeError:
        model = getattr(pl_module, attr, None) if "." not in attr else None
    if isinstance(model, nn.Module):
        return model
    if attr == DEFAULT_MODULE_ATTR and model is None:
        return pl_module
    names = module_attributes(pl_module)
    what = "is not an nn.Module" if model is not None else "does not exist"
    prefix = f"{who}: " if who else ""
    raise ConfigError(
        f"{prefix}module_attr={attr!r}: {type(pl_module).__name__}.{attr} {what}; the attributes holding modules are "
        f"{names}.{did_you_mean(attr, names)} Set module_attr to the attribute your training_step calls "
        "(or null for the LightningModule itself)."
    )


def set_target_module(pl_module: nn.Module, attr: str | None, model: nn.Module, option: str = "module_attr") -> None:
    """Replace ``pl_module.<attr>`` by ``model`` (graph surgery cannot replace the LightningModule itself)."""
    try:
        current = pl_module.get_submodule(attr) if attr else None
    except AttributeError:
        current = None
    if current is None or current is pl_module:
        names = [n for n, _ in pl_module.named_children()]
        raise ConfigError(
            f"{option}={attr!r}: {type(pl_module).__name__} has no submodule of that name to rewrite; "
            f"its children are {names}.{did_you_mean(attr, names) if attr else ''} Wrap the network as an attribute "
            "(e.g. self.model) and name it here."
        )
    parent, _, name = attr.rpartition(".")
    setattr(pl_module.get_submodule(parent) if parent else pl_module, name, model)



def _first_batch(loaders: Any) -> Any:
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    return None if loaders is None else next(iter(loaders))


def example_inputs(trainer: L.Trainer, n: int = 1, shape: list[int] | None = None) -> Any:
    """``n`` real examples on CPU: ``datamodule.sample_inputs(n)``, else a dataloader's first batch,
    else ``torch.randn(n, *shape)`` when ``shape`` is given; ``None`` when nothing is available."""
    datamodule = getattr(trainer, "datamodule", None)
    if callable(getattr(datamodule, "sample_inputs", None)):
        try:
            return to_cpu(datamodule.sample_inputs(n))
        except Exception as err:  # fall back to a dataloader batch
            log.warning("datamodule.sample_inputs(%d) failed (%s); using a dataloader batch", n, err)
    for name in ("val_dataloaders", "test_dataloaders", "train_dataloader"):
        try:
            batch = _first_batch(getattr(trainer, name, None))
        except (StopIteration, TypeError, AttributeError):
            continue
        if batch is not None:
            return resize_batch(to_cpu(model_inputs(batch)), n)
    if shape:
        return torch.randn(n, *shape)
    return None
