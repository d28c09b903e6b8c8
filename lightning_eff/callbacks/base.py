"""The small base every lightning_eff callback shares.

Why a base class: each technique addresses "the network" of a LightningModule through a
``module_attr`` option, and a typo there (``module_attr="nett"``) used to select the whole
LightningModule, or nothing, silently — differently per callback. Here it is resolved in one
place, at ``setup()`` (before any training), and refused with the attributes that do hold
modules and a did-you-mean. The base also gives every callback the same ``state_key`` helper,
so two instances with different options coexist in one checkpoint.

The check runs at fit start (after ``configure_model``); callbacks that operate on the network in
``setup`` call :meth:`network` there and fail at that point.
"""
from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from lightning_eff.callbacks.common import DEFAULT_MODULE_ATTR, check_module_attr, target_module

__all__ = ["EffCallback"]


class EffCallback(L.Callback):
    """Base of the lightning_eff callbacks: the network getter, the ``module_attr`` check, ``state_key``.

    Args:
        module_attr: attribute (dotted path allowed) of the LightningModule holding the network;
            ``None`` for the LightningModule itself. The default ``"model"`` falls back to the
            LightningModule when it has no such attribute; any other missing name is refused.
    """

    def __init__(self, module_attr: str | None = DEFAULT_MODULE_ATTR) -> None:
        super().__init__()
        self.module_attr = check_module_attr(module_attr)

    def network(self, pl_module: nn.Module) -> nn.Module:
        """``pl_module.<module_attr>``, or a :class:`~lightning_eff.errors.ConfigError` naming the attributes that exist."""
        return target_module(pl_module, self.module_attr, who=type(self).__name__)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        # A wrong module_attr fails here, before any training step. Not in setup(): Lightning calls the
        # callbacks' setup before LightningModule.setup()/configure_model(), where a user may build the
        # network. Callbacks that rewrite the network in setup (QAT, Pruning, Distillation) resolve it there.
        self.network(pl_module)

    def state_key_of(self, **options: Any) -> str:
        """``state_key`` from the options that tell two instances apart (``None`` values left out)."""
        return self._generate_state_key(**{k: v for k, v in options.items() if v is not None})
