"""The small base every lightning_eff callback shares.

Why a base class: each technique addresses "the network" of a LightningModule through a
``module_attr`` option, and a typo there (``module_attr="nett"``) used to select the whole
LightningModule, or nothing, silently — differently per callback. Here it is resolved in one
place, at ``setup()`` (before any training), and refused with the attributes that do hold
modules and a did-you-mean. The base also gives every callback the same ``state_key`` helper,
so two instances with different options coexist in one checkpoint, the
:class:`~lightning_eff.protocols.Deployable` defaults (no models, no files, exportable) and one
name for the folder a callback writes to: ``output_dir`` (the older ``artifact_dir`` / ``dirpath``
are accepted with a ``FutureWarning``).

The check runs at fit start (after ``configure_model``); callbacks that operate on the network in
``setup`` call :meth:`network` there and fail at that point.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from lightning_eff.callbacks.common import (
    DEFAULT_MODULE_ATTR,
    check_module_attr,
    target_module,
)
from lightning_eff.errors import ConfigError
from lightning_eff.naming import remap_keys
from lightning_eff.validation import renamed_option

__all__ = ["EffCallback", "output_dir_option", "install_name_remap"]


def output_dir_option(output_dir: Any, who: str, **old_names: Any) -> str | None:
    """The ``output_dir`` option, also given under an older name (``artifact_dir=``, ``dirpath=``).

    Raises:
        ConfigError: both names given, or a value that is not a path.
    """
    output_dir = renamed_option("output_dir", output_dir, who, stacklevel=4, **old_names)
    if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
        raise ConfigError(f"{who}: output_dir={output_dir!r} must be a path or None.")
    return None if output_dir is None else os.fspath(output_dir)


_REMAP_FLAG = "_lightning_eff_name_remap"


def install_name_remap(pl_module: L.LightningModule) -> None:
    """Let a checkpoint written with wrapped networks load into plain ones, and the reverse (once per module).

    ``torch.compile`` puts ``_orig_mod.`` into every key of the state dict; a checkpoint written while
    the network was compiled would not load into the plain network (and the reverse). The module's
    ``on_load_checkpoint`` (which Lightning calls just before loading the weights) is wrapped to rename
    each checkpoint key to the module's own key with the same canonical name
    (:func:`lightning_eff.naming.remap_keys`); keys without a counterpart stay, so a real mismatch still fails.
    """
    if getattr(pl_module, _REMAP_FLAG, False):
        return
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            checkpoint["state_dict"] = remap_keys(state, pl_module.state_dict().keys())
        original(checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint
    object.__setattr__(pl_module, _REMAP_FLAG, True)


class EffCallback(L.Callback):
    """Base of the lightning_eff callbacks: the network getter, the ``module_attr`` check, ``state_key``.

    Args:
        module_attr: attribute (dotted path allowed) of the LightningModule holding the network;
            ``None`` for the LightningModule itself. The default ``"model"`` falls back to the
            LightningModule when it has no such attribute; any other missing name is refused.
    """

    #: :class:`~lightning_eff.protocols.Deployable`: whether ``Export`` should re-export :meth:`deployable_models`.
    exportable: bool = True

    def __init__(self, module_attr: str | None = DEFAULT_MODULE_ATTR) -> None:
        super().__init__()
        self.module_attr = check_module_attr(module_attr)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        install_name_remap(pl_module)

    def deployable_models(self) -> dict[str, nn.Module]:
        """:class:`~lightning_eff.protocols.Deployable`: the models this callback produced (none by default)."""
        return {}

    def artifacts(self) -> list[dict[str, Any]]:
        """:class:`~lightning_eff.protocols.Deployable`: the files this callback wrote (none by default)."""
        return []

    def output_folder(self, trainer: L.Trainer, output_dir: str | None, default: str) -> Path:
        """``output_dir``, else ``<trainer.default_root_dir>/<default>``."""
        return Path(output_dir) if output_dir else Path(trainer.default_root_dir) / default

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
