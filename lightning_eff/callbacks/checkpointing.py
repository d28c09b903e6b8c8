"""``ActivationCheckpointing``: trade recomputation for activation memory in any LightningModule.

Lightning offers activation checkpointing only inside FSDP/DeepSpeed (its request for a plain
LightningModule, #1308, is open since 2020). This callback applies
:func:`lightning_eff.training.checkpointing.apply_activation_checkpointing` to the network for
training and removes it when training ends.

When: at ``on_fit_start``, not ``setup``. Every other callback's surgery has run by then (QAT
rewrites the network into an FX graph in its ``setup``, and the order of callbacks must not matter),
and the checkpoint wrappers hold no parameters of their own, so the optimizer and DDP (already
built) see the same parameters. At ``on_train_end`` the network is restored (QAT converts the graph
at fit end; a later fit stage starts from the plain network). State-dict keys are the same with and
without it, so checkpoints load either way.

Example:
    >>> import lightning as L
    >>> from lightning_eff.callbacks import ActivationCheckpointing
    >>> trainer = L.Trainer(callbacks=[ActivationCheckpointing(module_attr="net")], max_epochs=1)  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_eff.callbacks.base import EffCallback
from lightning_eff.callbacks.common import DEFAULT_MODULE_ATTR, example_inputs
from lightning_eff.errors import ConfigError
from lightning_eff.surgery import ModuleSelector
from lightning_eff.training.checkpointing import (
    MODEL_SWITCH_CHOICES,
    CheckpointingInfo,
    apply_activation_checkpointing,
    check_memory_budget,
    check_segments,
    remove_activation_checkpointing,
)
from lightning_eff.validation import check_bool, check_choice, renamed_option

__all__ = ["ActivationCheckpointing"]

log = logging.getLogger(__name__)
_OWN_CHECKPOINTING = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class ActivationCheckpointing(EffCallback):
    """Checkpoint the network's blocks during training: activations of a block are recomputed in backward.

    Args:
        include: ``"auto"`` (the default: transformer layers, timm blocks/stages, the longest list of blocks) or
            regexes over module names, e.g. ``["features\\\\.\\\\d+"]`` (``modules`` is its old name).
        module_types: class names to checkpoint (``["InvertedResidual"]``), alone or with ``include``.
        exclude: regexes of module names never checkpointed.
        use_model_switch: ``"auto"``: a Hugging Face / timm model's own switch when it is safe
            (no BatchNorm state); ``"always"``; ``"never"`` (always wrap blocks here).
        segments: pieces an FX/pt2e graph (a QAT-prepared network) is cut into (default ``√nodes``).
        preserve_rng_state: identical dropout in the recomputation (identical gradients).
        reentrant: torch's older reentrant checkpoints (refused with DDP's ``find_unused_parameters``
            and with BatchNorm/observer state); the default non-reentrant form has neither limit.
        memory_budget: checkpoint only the blocks (and their parts) it takes to bring the activations saved
            for backward to this fraction of the plain network's: the set that frees enough for the least
            recomputation, measured on real examples (``None``: every selected block; most memory saved, slowest).
            Measured on MobileNetV2 and the BERT student: ``0.45`` keeps ~0.4x of the activations for a
            1.2-1.35x step, every block ~0.1x for 1.4-1.5x (``python -m lightning_eff.bench training_efficiency``).
        module_attr: attribute of the LightningModule holding the network (``None`` = the module itself).

    Raises:
        ConfigError: a bad option; at fit start, a combination that cannot work (a strategy with its
            own activation checkpointing, reentrant checkpoints under DDP's ``find_unused_parameters``).
    """

    def __init__(
        self,
        include: str | Sequence[str] | None = None,
        module_types: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        use_model_switch: str = "auto",
        segments: int | None = None,
        preserve_rng_state: bool = True,
        reentrant: bool = False,
        memory_budget: float | None = None,
        module_attr: str | None = DEFAULT_MODULE_ATTR,
        modules: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(module_attr)
        modules = renamed_option("include", include, "ActivationCheckpointing", modules=modules)
        modules = "auto" if modules is None else modules
        if modules != "auto":
            ModuleSelector(include=modules, exclude=exclude, types=module_types)  # checks the patterns
        elif exclude is not None:
            ModuleSelector(exclude=exclude)
        # plain lists (Hydra gives ListConfig): state_key and the checkpoint see the same values either way
        self.include = modules if isinstance(modules, str) else list(modules)
        self.module_types = module_types if module_types is None or isinstance(module_types, str) else list(module_types)
        self.exclude = exclude if exclude is None or isinstance(exclude, str) else list(exclude)
        self.use_model_switch = check_choice("use_model_switch", use_model_switch, MODEL_SWITCH_CHOICES)
        self.segments = check_segments(segments)
        self.preserve_rng_state = check_bool("preserve_rng_state", preserve_rng_state)
        self.reentrant = check_bool("reentrant", reentrant)
        self.memory_budget = check_memory_budget(memory_budget)
        self.info: CheckpointingInfo | None = None

    @property
    def state_key(self) -> str:  # noqa: D102
        # `modules=`: the key's old spelling, so older checkpoints still resume
        return self.state_key_of(modules=self.include, module_types=self.module_types, memory_budget=self.memory_budget,
                                 module_attr=self.module_attr)

    def _check_strategy(self, trainer: L.Trainer) -> None:
        strategy = trainer.strategy
        name = type(strategy).__name__
        if name in _OWN_CHECKPOINTING:
            raise ConfigError(f"ActivationCheckpointing: {name} checkpoints activations itself; use its "
                              "activation_checkpointing_policy option instead of this callback.")
        find_unused = bool(getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False))
        if self.reentrant and find_unused:
            raise ConfigError("ActivationCheckpointing(reentrant=True) with DDP's find_unused_parameters=True: the "
                              "reentrant form re-runs the forward inside backward, where DDP cannot mark parameters "
                              "ready (torch raises 'Expected to mark a variable ready only once'); use reentrant=False.")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._check_strategy(trainer)
        net = self.network(pl_module)
        inputs = None
        if self.memory_budget is not None:
            inputs = move_data_to_device(example_inputs(trainer, n=8), pl_module.device)
            if inputs is None:
                raise ConfigError("ActivationCheckpointing(memory_budget=...) needs example inputs to profile the blocks: "
                                  "give the datamodule a sample_inputs(n) method or a train dataloader.")
        self.info = apply_activation_checkpointing(
            net, include=self.include, module_types=self.module_types, exclude=self.exclude,
            use_model_switch=self.use_model_switch, segments=self.segments,
            preserve_rng_state=self.preserve_rng_state, reentrant=self.reentrant,
            memory_budget=self.memory_budget, example_inputs=inputs)
        log.info("ActivationCheckpointing: %s %s", self.info.summary(), self.info.modules[:6])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        remove_activation_checkpointing(self.network(pl_module))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:  # noqa: D102
        # a failed fit leaves the user's network as it was given
        if self.info is not None:
            remove_activation_checkpointing(self.network(pl_module))

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"version": 1}  # nothing to restore: the wrappers are re-applied at every fit start
