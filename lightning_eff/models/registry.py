"""Model registry: one decorator, one factory.

Example:
    >>> from lightning_eff.models import create_model
    >>> net = create_model("mobilenetv2_tiny", num_classes=10, in_chans=1)
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_eff.errors import ConfigError, did_you_mean

__all__ = ["register_model", "create_model", "list_models", "model_signature"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
log = logging.getLogger(__name__)


def register_model(name: str | None = None) -> Callable:
    """Register a factory ``fn(**kwargs) -> nn.Module`` under ``name`` (default: the function name)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise ConfigError(f"model name {key!r} is registered twice")
        _REGISTRY[key] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


#: Options every registered model accepts (handled here, not by the factories).
GENERIC_OPTIONS = ("backbone_ckpt",)


def model_signature(name: str) -> inspect.Signature:
    """The keyword arguments the factory of ``name`` accepts (used by config validation), with
    :data:`GENERIC_OPTIONS`: ``backbone_ckpt`` (a pretrained backbone, see :func:`create_model`)."""
    sig = inspect.signature(_get(name))
    extra = [inspect.Parameter(o, inspect.Parameter.KEYWORD_ONLY, default=None) for o in GENERIC_OPTIONS
             if o not in sig.parameters]
    params = list(sig.parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + extra + var_kw
    return sig.replace(parameters=params)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. ``None`` kwargs are dropped so configs can leave options unset.

    Raises:
        ConfigError: unknown model name or an argument the factory does not take.
    """
    fn = _get(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    backbone = kwargs.pop("backbone_ckpt", None)
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in kwargs:
            if key not in params:
                valid = sorted([*params, *GENERIC_OPTIONS])
                raise ConfigError(f"model {name!r} has no option {key!r}; valid options: {valid}.{did_you_mean(key, valid)}")
    model = fn(**kwargs)
    if backbone is not None:
        # self-supervised pretraining -> fine-tuning: the pretrained backbone, a fresh head
        from lightning_eff.models.backbone import load_backbone

        copied = load_backbone(model, backbone, "model.backbone_ckpt")
        log.info("model %s: %d tensors of the backbone loaded from %s", name, len(copied), backbone)
    return model


def _get(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise ConfigError(f"model.name={name!r} is not registered; choose one of {list_models()}.{did_you_mean(name, _REGISTRY)}")
    return _REGISTRY[name]
