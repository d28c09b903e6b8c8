"""Quantization callbacks: QAT and PTQ for any LightningModule (thin layer over the functional core).

``QuantizationAwareTraining`` rewrites ``pl_module.<module_attr>`` in :meth:`setup` — before the
checkpoint is restored, before DDP wraps the model and before optimizers are built — so resume,
DDP and the optimizer all see the prepared (fake-quant) network. When fake quantization starts,
when observers freeze and when BatchNorm statistics freeze are pure functions of the global step,
so a resumed run recomputes them exactly. At the end of fit it converts a *copy* to int8 for each
requested engine: the trained LightningModule stays trainable, testable and re-fittable (the
failure of Lightning 1.x's callback, Lightning #7427 and #12896).

``PostTrainingQuantization`` quantizes a copy of the trained float model at the end of fit:
static int8 calibrated on batches of the datamodule (the survey's "representative dataset"), or
dynamic int8 for Linear/LSTM/GRU-heavy text models.

Example:
    >>> qat = QuantizationAwareTraining(engines=["x86"], start_fraction=0.5)
    >>> trainer = L.Trainer(max_epochs=1, callbacks=[qat])
    >>> trainer.fit(task, datamodule=dm)
    >>> int8 = qat.deployable_models()["qat_int8_x86"]
    >>> int8(dm.sample_inputs(2)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_eff.batch import cpu_copy, model_inputs
from lightning_eff.callbacks.base import EffCallback
from lightning_eff.callbacks.common import example_inputs, set_target_module
from lightning_eff.compression.quantization.engines import (
    check_engine,
    quantized_engine,
)
from lightning_eff.compression.quantization.fx import (
    OBSERVERS,
    calibrate,
    check_per_channel,
    convert_fx_model,
    dynamic_quantize,
    freeze_bn_stats,
    is_fake_quant,
    prepare_ptq_fx_model,
    prepare_qat_fx_model,
    set_fake_quant,
    set_observers,
)
from lightning_eff.errors import ConfigError
from lightning_eff.naming import unwrap_model
from lightning_eff.schedules import check_step_or_fraction, resolve_step
from lightning_eff.surgery import (
    check_submodule,
    get_submodule,
    set_submodule,
    submodule_inputs,
)
from lightning_eff.validation import as_list, check_bool, check_choice, check_int

__all__ = ["QuantizationAwareTraining", "PostTrainingQuantization", "FLOWS"]

log = logging.getLogger(__name__)

FLOWS = ["fx", "pt2e"]
_FLOAT32 = {"32-true", "32", 32, "64-true", "64", 64}
_STATE_VERSION = 1


def _check_precision(trainer: L.Trainer, who: str) -> None:
    precision = getattr(trainer, "precision", "32-true")
    if precision not in _FLOAT32:
        raise ConfigError(
            f"{who} needs 32-bit training: trainer.precision={precision!r} is not supported "
            "(fake quantization and observers run in float32). Set trainer.precision='32-true'."
        )


def _engines(option: str, engines: list[str] | str | None, flow: str) -> list[str]:
    if flow == "pt2e":
        return ["xnnpack"]
    engines = ["x86"] if engines is None else as_list(option, engines, item=str)
    if not engines:
        raise ConfigError(f"{option}=[] must name at least one engine.")
    return [check_engine(e, option) for e in engines]


def _check_per_channel(per_channel: Any, flow: str) -> bool | str:
    check_per_channel(per_channel)
    if per_channel == "depthwise" and flow != "fx":
        raise ConfigError("per_channel='depthwise' needs flow='fx'; the XNNPACK quantizer (pt2e) takes true or false.")
    return per_channel


def _check_submodule(submodule: str | None, flow: str) -> str | None:
    if check_submodule(submodule) is None:
        return None
    if flow != "fx":
        raise ConfigError(f"submodule={submodule!r} needs flow='fx': a pt2e graph is exported with static non-batch "
                          "shapes, which the variable-length inputs of text encoders do not have.")
    return submodule


def _hosted(net: nn.Module, submodule: str | None, quantized: nn.Module) -> nn.Module:
    """The deployable model: ``quantized`` itself, or a CPU copy of ``net`` with ``quantized`` at ``submodule``."""
    if not submodule:
        return quantized
    inner = net.get_submodule(submodule)
    # Deep-copy the host without the (possibly fake-quant, possibly on GPU) submodule, then plug in.
    set_submodule(net, submodule, nn.Identity())
    try:
        host = cpu_copy(net)
    finally:
        set_submodule(net, submodule, inner)
    set_submodule(host, submodule, quantized)
    return host


def _as_args(inputs: Any) -> tuple:
    return (inputs,)  # the network takes a batch's inputs as one argument (a tensor, or the batch's strings)


class QuantizationAwareTraining(EffCallback):
    """Quantization-aware training (survey §3.1.2, Jacob et al. 2018) for any LightningModule.

    Args:
        flow: ``"fx"`` (torch.ao FX graph mode → TorchScript / lite interpreter with x86 or QNNPACK
            kernels) or ``"pt2e"`` (torch.export + torchao + XNNPACKQuantizer → ExecuTorch).
        engines: FX engines to convert for, the first one also trains (``["x86", "qnnpack"]``).
        per_channel: per-output-channel int8 weights; ``"depthwise"``: only for depthwise convs,
            per-tensor elsewhere (FX flow; smaller artifacts at nearly the same accuracy).
        observer: activation range observer: ``"moving_average"``, ``"minmax"`` or ``"histogram"``.
        relu6: ``"relu"`` (ReLU6 → ReLU so conv+bn+relu fuses into one int8 kernel, torchvision's
            choice) or ``"keep"``.
        start_step / start_fraction: when fake quantization starts (observers run from step 0 so
            ranges are warm); default: from the first step.
        freeze_observer_step / freeze_observer_fraction: when scale/zero-point stop updating.
        freeze_bn_step / freeze_bn_fraction: when BatchNorm statistics freeze (FX flow).
        fold_bn: fold BatchNorm into the convolutions before QAT (FX flow): the network fine-tunes
            without BatchNorm, as the int8 model runs, and a QAT step costs about 0.65x the fused
            Conv-BN QAT step (no batch statistics, no rescaling pass). For fine-tuning a trained
            model; excludes ``freeze_bn_*`` (there is no BatchNorm left to freeze). On ``make train``'s
            MobileNetV2 it kept about 0.2 points less int8 accuracy than Conv-BN QAT (README results).
        module_attr: attribute of the LightningModule holding the network to quantize.
        submodule: quantize only this (dotted) submodule of the network, e.g. ``"encoder"`` of the
            projection models, whose string hashing runs in Python and cannot be traced. Its inputs
            are captured by running the network on real examples; the deployable int8 model is the
            whole network with the converted submodule in place (FX flow only).
        example_input_shape: input shape without batch (e.g. ``[1, 32, 32]``) when the datamodule has
            no ``sample_inputs``.
        convert_on_fit_end: convert a copy to int8 at the end of fit (else on first request).

    Raises:
        ConfigError: an option outside its choices/range; at ``setup``: precision other than 32-bit,
            an untraceable or unquantizable module (named), no attribute ``module_attr``.
    """

    def __init__(
        self,
        flow: str = "fx",
        engines: list[str] | str | None = None,
        per_channel: bool | str = True,
        observer: str = "moving_average",
        relu6: str = "relu",
        start_step: int | None = None,
        start_fraction: float | None = None,
        freeze_observer_step: int | None = None,
        freeze_observer_fraction: float | None = None,
        freeze_bn_step: int | None = None,
        freeze_bn_fraction: float | None = None,
        fold_bn: bool = False,
        module_attr: str = "model",
        submodule: str | None = None,
        example_input_shape: list[int] | None = None,
        convert_on_fit_end: bool = True,
    ) -> None:
        super().__init__(module_attr)
        self.flow = check_choice("flow", flow, FLOWS)
        self.engines = _engines("engines", engines, flow)
        self.per_channel = _check_per_channel(per_channel, flow)
        self.observer = check_choice("observer", observer, list(OBSERVERS))
        self.relu6 = check_choice("relu6", relu6, ["relu", "keep"])
        for name, step, frac in (("start", start_step, start_fraction), ("freeze_observer", freeze_observer_step, freeze_observer_fraction),
                                 ("freeze_bn", freeze_bn_step, freeze_bn_fraction)):
            check_step_or_fraction(name, step, frac)
        if flow == "pt2e" and (freeze_bn_step is not None or freeze_bn_fraction is not None):
            raise ConfigError("freeze_bn_step/freeze_bn_fraction apply to flow='fx' only (pt2e folds BN at convert).")
        self.fold_bn = check_bool("fold_bn", fold_bn)
        if fold_bn and flow != "fx":
            raise ConfigError(f"fold_bn=True applies to flow='fx' only (flow={flow!r}: pt2e folds BN at convert).")
        if fold_bn and (freeze_bn_step is not None or freeze_bn_fraction is not None):
            raise ConfigError(f"fold_bn=True folds BatchNorm before training, so freeze_bn_step={freeze_bn_step!r} / "
                              f"freeze_bn_fraction={freeze_bn_fraction!r} has nothing to freeze; set them to null, or fold_bn=False.")
        self.start = (start_step, start_fraction)
        self.freeze_observer = (freeze_observer_step, freeze_observer_fraction)
        self.freeze_bn = (freeze_bn_step, freeze_bn_fraction)
        self.submodule = _check_submodule(submodule, flow)
        if example_input_shape is not None:
            example_input_shape = [check_int("example_input_shape[]", d, low=1) for d in as_list("example_input_shape", example_input_shape)]
        self.example_input_shape = example_input_shape
        self.convert_on_fit_end = check_bool("convert_on_fit_end", convert_on_fit_end)
        self._prepared: nn.Module | None = None
        self._net: nn.Module | None = None
        self._pt2e_training = False
        self._counters: dict[str, torch.Tensor] = {}
        self._bn_frozen_once = False
        self._applied: tuple | None = None
        self._converted: dict[str, nn.Module] = {}
        self._converted_at: int | None = None
        self._trainer: L.Trainer | None = None

    @property
    def state_key(self) -> str:  # noqa: D102
        return self.state_key_of(flow=self.flow, engines=tuple(self.engines), module_attr=self.module_attr, submodule=self.submodule)

    # ---------------------------------------------------------------- surgery
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        super().setup(trainer, pl_module, stage)
        _check_precision(trainer, "QuantizationAwareTraining")
        self._trainer = trainer
        net = self.network(pl_module)
        current = get_submodule(net, self.submodule) if self.submodule else net
        if self._prepared is not None and current is self._prepared:
            return  # setup runs again for validate/test: keep the prepared model
        wrapped, current = current, unwrap_model(current)
        if current is not self._prepared and is_fake_quant(current):
            raise ConfigError(
                f"QuantizationAwareTraining: the network (module_attr={self.module_attr!r}"
                f"{f', submodule={self.submodule!r}' if self.submodule else ''}) is already prepared for quantization-aware "
                "training (it has fake-quant modules), e.g. by another QuantizationAwareTraining callback: preparing it again "
                "would stack fake quantization. Use one QuantizationAwareTraining per network (to train it further, reuse "
                "the callback that prepared it).")
        if current is not wrapped:  # torch.compile / checkpoint wrapper / DDP: quantize the network inside
            rank_zero_info(f"QuantizationAwareTraining: preparing the {type(current).__name__} inside its "
                           f"{type(wrapped).__name__} wrapper; the prepared graph replaces the wrapper.")
        inputs = self._example(trainer, 2 if self.flow == "pt2e" else 1)
        if self.submodule:
            inputs = submodule_inputs(net, self.submodule, inputs)
        if self.flow == "fx":
            prepared = prepare_qat_fx_model(
                current, inputs, engine=self.engines[0], per_channel=self.per_channel, observer=self.observer, relu6=self.relu6,
                fold_bn=self.fold_bn,
            )
        else:
            from lightning_eff.compression.quantization.pt2e import prepare_pt2e_model

            batch = torch.export.Dim("batch", min=1, max=4096)
            prepared = prepare_pt2e_model(current.cpu(), inputs, qat=True, per_channel=self.per_channel,
                                          dynamic_shapes=({0: batch},))
        prepared.to(pl_module.device)
        if self.submodule:
            set_submodule(net, self.submodule, prepared)
        else:
            set_target_module(pl_module, self.module_attr, prepared)
        self._net = net
        self._prepared = prepared
        self._pt2e_training = self.flow == "pt2e"  # prepare_pt2e_model(qat=True) returns train-mode ops
        self._applied = None
        rank_zero_info(f"QuantizationAwareTraining: prepared {type(current).__name__} for {self.flow}/{self.engines[0]}")

    def _example(self, trainer: L.Trainer, n: int) -> Any:
        inputs = example_inputs(trainer, n, self.example_input_shape)
        if inputs is None:
            raise ConfigError(
                "QuantizationAwareTraining needs example inputs to trace the model: give the datamodule a "
                "sample_inputs(n) method or set example_input_shape=[C, H, W]."
            )
        return inputs

    # ---------------------------------------------------------------- schedule
    def flags_at(self, step: int, total_steps: float | None) -> tuple[bool, bool, bool]:
        """(fake_quant_enabled, observers_enabled, bn_frozen) at global ``step`` — a pure function."""
        start = resolve_step(*self.start, total_steps) or 0
        freeze_obs = resolve_step(*self.freeze_observer, total_steps)
        freeze_bn = resolve_step(*self.freeze_bn, total_steps)
        fake_quant = step >= start
        observers = freeze_obs is None or step < freeze_obs
        bn_frozen = freeze_bn is not None and step >= freeze_bn
        return fake_quant, observers, bn_frozen

    def _apply(self, trainer: L.Trainer) -> None:
        if self._prepared is None:
            return
        flags = self.flags_at(trainer.global_step, trainer.estimated_stepping_batches)
        if flags == self._applied:
            return
        fake_quant, observers, bn_frozen = flags
        set_fake_quant(self._prepared, fake_quant)
        set_observers(self._prepared, observers)
        if self.flow == "fx" and (bn_frozen if self._applied is None else bn_frozen != self._applied[2]):
            freeze_bn_stats(self._prepared, bn_frozen)
        elif self.flow == "fx" and self._applied is None and self._bn_frozen_once:
            freeze_bn_stats(self._prepared, False)  # a later fit whose schedule starts unfrozen again
        self._bn_frozen_once = self._bn_frozen_once or bn_frozen
        self._applied = flags

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._applied = None
        self._apply(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._apply(trainer)
        if self.flow == "pt2e" and not self._pt2e_training:
            self._set_pt2e_mode(True)

    # pt2e graphs bake train/eval behaviour into their ops (batch norm, dropout); torchao rewrites the
    # ops to switch. After validation Lightning restores modes by assigning ``.training`` (it does not
    # call ``.train()``), which would leave eval-mode batch norm training silently (running statistics
    # frozen, and a resumed run diverging from an uninterrupted one). So the ops' mode is tracked here.
    def _set_pt2e_mode(self, training: bool) -> None:
        if self.flow == "pt2e" and self._prepared is not None:
            from lightning_eff.compression.quantization.pt2e import set_pt2e_training

            set_pt2e_training(self._prepared, training)
            self._pt2e_training = training

    # Observers (and the scale / zero point they drive) must move in training steps only. torch.ao's
    # FakeQuantize observes whenever ``observer_enabled`` is set — in eval mode too — so a validate(),
    # test(), predict() or the sanity check would otherwise pull validation/test data into the
    # quantization ranges, and a resumed run (whose sanity check sees other data at another moment)
    # would diverge from an uninterrupted one. Every evaluation therefore freezes them, and the next
    # training batch re-applies the step schedule (``_applied = None``).
    # An exported (pt2e) graph also keeps BatchNorm's ``num_batches_tracked += 1`` op in eval mode, so
    # those counters are saved before an evaluation and put back after it.
    def _freeze_for_evaluation(self) -> None:
        if self._prepared is None:
            return
        set_observers(self._prepared, False)
        self._applied = None
        self._set_pt2e_mode(False)
        if self.flow == "pt2e":
            self._counters = {k: v.clone() for k, v in self._prepared.named_buffers() if k.endswith("num_batches_tracked")}

    def _after_evaluation(self) -> None:
        if self._prepared is not None and self._counters:
            buffers = dict(self._prepared.named_buffers())
            with torch.no_grad():
                for k, v in self._counters.items():
                    buffers[k].copy_(v)
        self._counters = {}

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._freeze_for_evaluation()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._after_evaluation()

    on_test_start = on_predict_start = on_validation_start
    on_test_end = on_predict_end = on_validation_end

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        # After fit the model is evaluated, exported or called by hand: nothing may move its ranges.
        self._freeze_for_evaluation()

    # ---------------------------------------------------------------- conversion
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        # An Export callback earlier in the list may already have asked for the models at this step.
        if self.convert_on_fit_end and trainer.is_global_zero and self._converted_at != trainer.global_step:
            self.convert()

    def convert(self) -> dict[str, nn.Module]:
        """Convert a CPU copy of the prepared model to int8 for every engine; the prepared model is untouched."""
        if self._prepared is None:
            raise ConfigError("QuantizationAwareTraining.convert(): the model was never prepared (attach the callback to a fit first).")
        self._converted = {}
        started = time.perf_counter()
        if self.flow == "fx":
            for engine in self.engines:
                int8 = convert_fx_model(cpu_copy(self._prepared), engine=engine, inplace=True)
                self._converted[f"qat_int8_{engine}"] = _hosted(self._net, self.submodule, int8)
        else:
            from lightning_eff.compression.quantization.pt2e import convert_pt2e_model

            self._converted["qat_int8_xnnpack"] = convert_pt2e_model(copy.deepcopy(self._prepared).cpu())
        self._converted_at = self._trainer.global_step if self._trainer is not None else None
        log.info("QuantizationAwareTraining: converted to %s in %.0f s", sorted(self._converted), time.perf_counter() - started)
        return self._converted

    def deployable_models(self) -> dict[str, nn.Module]:
        """``{"qat_int8_<engine>": int8 model}`` (converted on first request if not yet)."""
        if not self._converted and self._prepared is not None:
            self.convert()
        return dict(self._converted)

    @property
    def prepared_model(self) -> nn.Module | None:
        """The fake-quant model being trained (``None`` before ``setup``)."""
        return self._prepared

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        # Observer statistics, scales and zero points are buffers of the prepared model, saved with
        # the LightningModule; the schedule is a function of global_step. Only plain values here.
        return {"version": _STATE_VERSION, "flow": self.flow, "engines": list(self.engines), "fold_bn": self.fold_bn}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        if state_dict.get("flow", self.flow) != self.flow:
            raise ConfigError(f"checkpoint was trained with flow={state_dict['flow']!r}, this callback has flow={self.flow!r}.")
        if state_dict.get("fold_bn", False) != self.fold_bn:  # checkpoints older than the option had no folding
            raise ConfigError(f"checkpoint was trained with fold_bn={state_dict.get('fold_bn', False)!r}, "
                              f"this callback has fold_bn={self.fold_bn!r}: the networks differ (BatchNorm folded or not).")


class PostTrainingQuantization(EffCallback):
    """Post-training int8 quantization of a copy of the trained model, at the end of fit.

    Args:
        mode: ``"static"`` (weights and activations int8; calibrated on ``calibration_batches``
            batches of the train loader) or ``"dynamic"`` (weights int8, activations quantized on
            the fly; for Linear/LSTM/GRU-heavy models).
        flow: ``"fx"`` (TorchScript/lite; engines below) or ``"pt2e"`` (XNNPACK / ExecuTorch, static only).
        engines: FX engines to produce a model for.
        per_channel: per-channel weights (static); ``"depthwise"`` as in :class:`QuantizationAwareTraining`.
        observer: activation observer for calibration (``"histogram"`` minimises L2 error).
        relu6: ``"keep"`` (float-trained clips stay: no re-training follows) or ``"relu"``.
        calibration_batches: how many batches the observers see.
        module_attr: attribute of the LightningModule holding the network.
        submodule: quantize only this (dotted) submodule (see :class:`QuantizationAwareTraining`);
            the deployable model is the whole network with the int8 submodule in place.

    Raises:
        ConfigError: bad option; dynamic mode with the pt2e flow.
    """

    def __init__(
        self,
        mode: str = "static",
        flow: str = "fx",
        engines: list[str] | str | None = None,
        per_channel: bool | str = True,
        observer: str = "histogram",
        relu6: str = "keep",
        calibration_batches: int = 32,
        module_attr: str = "model",
        submodule: str | None = None,
    ) -> None:
        super().__init__(module_attr)
        self.mode = check_choice("mode", mode, ["static", "dynamic"])
        self.flow = check_choice("flow", flow, FLOWS)
        if flow == "pt2e" and mode == "dynamic":
            raise ConfigError("mode='dynamic' is available with flow='fx' only; use mode='static' for pt2e/XNNPACK.")
        self.engines = _engines("engines", engines, flow)
        self.per_channel = _check_per_channel(per_channel, flow)
        self.observer = check_choice("observer", observer, list(OBSERVERS))
        self.relu6 = check_choice("relu6", relu6, ["relu", "keep"])
        self.calibration_batches = check_int("calibration_batches", calibration_batches, low=1)
        self.submodule = _check_submodule(submodule, flow)
        self._models: dict[str, nn.Module] = {}
        self._trainer: L.Trainer | None = None
        self._pl_module: L.LightningModule | None = None

    @property
    def state_key(self) -> str:  # noqa: D102
        return self.state_key_of(mode=self.mode, flow=self.flow, engines=tuple(self.engines), module_attr=self.module_attr,
                                 submodule=self.submodule)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        super().setup(trainer, pl_module, stage)
        self._trainer, self._pl_module = trainer, pl_module

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.is_global_zero:
            self.quantize(trainer, pl_module)

    def _batches(self, trainer: L.Trainer):
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else trainer.train_dataloader
        for i, batch in enumerate(loader):
            if i >= self.calibration_batches:
                return
            yield model_inputs(batch)

    def quantize(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, nn.Module]:
        """Quantize a CPU copy of the trained network; returns ``{"ptq_int8_<engine>": model}``."""
        started = time.perf_counter()
        net = cpu_copy(self.network(pl_module))
        float_model = unwrap_model(get_submodule(net, self.submodule) if self.submodule else net)
        self._models = {}
        if self.mode == "dynamic":
            for engine in self.engines:
                int8 = dynamic_quantize(float_model, engine=engine)
                self._models[f"ptq_dynamic_int8_{engine}"] = _hosted(net, self.submodule, int8)
            return self._models
        example = example_inputs(trainer, 2 if self.flow == "pt2e" else 1)
        if self.submodule:
            example = submodule_inputs(net, self.submodule, example)
        if self.flow == "fx":
            for engine in self.engines:
                prepared = prepare_ptq_fx_model(float_model, example, engine=engine, per_channel=self.per_channel,
                                                observer=self.observer, relu6=self.relu6)
                if self.submodule:  # calibrate through the whole network: the submodule sees its real inputs
                    host = _hosted(net, self.submodule, prepared)
                    with quantized_engine(engine):
                        calibrate(host, self._batches(trainer), input_fn=_as_args)
                else:
                    calibrate(prepared, self._batches(trainer))
                int8 = convert_fx_model(prepared, engine=engine, inplace=True)
                self._models[f"ptq_int8_{engine}"] = _hosted(net, self.submodule, int8)
        else:
            from lightning_eff.compression.quantization.pt2e import (
                convert_pt2e_model,
                prepare_pt2e_model,
            )

            batch = torch.export.Dim("batch", min=1, max=4096)
            prepared = prepare_pt2e_model(float_model, example, qat=False, per_channel=self.per_channel, dynamic_shapes=({0: batch},))
            with torch.no_grad():
                for inputs in self._batches(trainer):
                    prepared(inputs)
            self._models["ptq_int8_xnnpack"] = convert_pt2e_model(prepared, inplace=True)
        log.info("PostTrainingQuantization: calibrated on %d batches and converted %s in %.0f s", self.calibration_batches,
                 sorted(self._models), time.perf_counter() - started)
        return self._models

    def deployable_models(self) -> dict[str, nn.Module]:
        """``{"ptq_int8_<engine>": int8 model}`` produced at the end of fit."""
        if not self._models and self._trainer is not None and self._pl_module is not None:
            self.quantize(self._trainer, self._pl_module)
        return dict(self._models)
