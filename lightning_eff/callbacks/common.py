"""Helpers every callback shares: which submodule to operate on, example inputs, CPU copies."""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_eff.data.indexed import IndexedBatch
from lightning_eff.errors import ConfigError, did_you_mean
from lightning_eff.infra.footprint import call_with_inputs, resize_batch

__all__ = ["DEFAULT_MODULE_ATTR", "module_attributes", "check_module_attr", "target_module", "set_target_module", "get_submodule", "check_submodule", "set_submodule", "submodule_inputs",
           "example_inputs",
           "model_inputs", "to_cpu", "cpu_copy"]

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


def get_submodule(net: nn.Module, path: str, option: str = "submodule") -> nn.Module:
    """``net.<path>`` (dotted), or a ConfigError naming the option and the submodules that exist."""
    try:
        return net.get_submodule(path)
    except AttributeError:
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
    setattr(net.get_submodule(parent) if parent else net, name, module)


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


def model_inputs(batch: Any) -> Any:
    """Inputs part of a dataloader batch: ``batch[0]`` of a tuple/list, a dict minus its labels.

    An :class:`~lightning_eff.data.indexed.IndexedBatch` (training batches while offline
    distillation is on) is unwrapped first: its index tensor is not an input.
    """
    if isinstance(batch, IndexedBatch):
        batch = batch.batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in ("labels", "label")}
    return batch


def to_cpu(value: Any) -> Any:
    """Detach and move tensors (nested in dicts/lists) to CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_cpu(v) for v in value)
    return value


def cpu_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode, so measuring or converting never touches the model being trained."""
    return copy.deepcopy(model).cpu().eval()


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
