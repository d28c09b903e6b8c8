"""``Compile`` and ``ChannelsLast``: the compiler and the memory layout as one-line callbacks.

Both act on the network (``module_attr``) after every other callback's surgery: QAT and Pruning
rewrite or re-bind the network in their ``setup``, so applying these at ``on_fit_start`` means the
order of callbacks does not matter. Neither changes a parameter's identity or a state-dict key, so
the optimizer, DDP and checkpoints are unaffected.

- ``Compile`` compiles the network in place for training and un-compiles it when training ends:
  conversion (QAT), export and the report then work on the plain module (an exported artifact is
  compiled by its own runtime). The report times compiled inference separately (``report.compile``).
- ``ChannelsLast`` stores 4-D weights NHWC and converts 4-D inputs on entry (a forward pre-hook)
  while training (and during a ``validate``/``test``/``predict`` of its own); when training ends the
  network is NCHW again, so quantization, export and the report work on it as given (int8
  calibration and kernels are much slower on NHWC tensors). Export's ``channels_last`` option bakes
  the layout into TorchScript artifacts where the runtime gains from it.

Example:
    >>> from lightning_eff.callbacks import ChannelsLast, Compile
    >>> callbacks = [ChannelsLast(module_attr="net"), Compile(backend="inductor", module_attr="net")]
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_eff.callbacks.base import EffCallback
from lightning_eff.callbacks.common import DEFAULT_MODULE_ATTR
from lightning_eff.errors import ConfigError
from lightning_eff.training.layout import (
    check_batchnorm_backward,
    check_compile_options,
    check_inplace_activations,
    compile_network,
    is_compiled,
    to_channels_last,
    uncompile_network,
)
from lightning_eff.validation import check_bool

__all__ = ["ChannelsLast", "Compile"]

log = logging.getLogger(__name__)


class Compile(EffCallback):
    """``torch.compile`` the network for training (in place: names and checkpoints unchanged).

    Args:
        backend: a ``torch.compile`` backend (``"inductor"``; ``"eager"``/``"aot_eager"`` for debugging).
        mode: ``None``/``"default"``, ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"``, ...
        fullgraph: fail on a graph break instead of falling back to Python for that part.
        dynamic: dynamic shapes (``None``: torch decides after a shape changes).
        module_attr: attribute of the LightningModule holding the network.

    Raises:
        ConfigError: an unknown backend or mode (the choices are listed).
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, fullgraph: bool = False,
                 dynamic: bool | None = None, module_attr: str | None = DEFAULT_MODULE_ATTR) -> None:
        super().__init__(module_attr)
        check_compile_options(backend, mode, fullgraph, dynamic)
        self.backend, self.mode, self.fullgraph, self.dynamic = backend, mode, fullgraph, dynamic
        self._compiled: nn.Module | None = None

    @property
    def state_key(self) -> str:  # noqa: D102
        return self.state_key_of(backend=self.backend, mode=self.mode, module_attr=self.module_attr)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        net = self.network(pl_module)
        if is_compiled(net):
            raise ConfigError(f"Compile: the network ({type(net).__name__}) is already compiled (another Compile callback, "
                              "or torch.compile in your code); compile it once.")
        self._compiled = compile_network(net, self.backend, self.mode, self.fullgraph, self.dynamic)
        log.info("Compile: %s compiled in place (backend=%s, mode=%s)", type(net).__name__, self.backend, self.mode)

    def _restore(self) -> None:
        if self._compiled is not None:
            uncompile_network(self._compiled)
            self._compiled = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:  # noqa: D102
        self._restore()

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"version": 1}  # nothing to restore: compiled again at every fit start


class ChannelsLast(EffCallback):
    """Train and evaluate the network in channels-last (NHWC) memory layout.

    Args:
        inputs: also convert 4-D inputs on entry to the network (else only the weights: convolutions
            then still produce NHWC outputs, but the first one converts its input on every call).
        batchnorm_backward: ``"auto"``: the BatchNorms whose channel count is on ATen's slow channels-last
            backward path with more than one thread (fewer than 32 and not a multiple of 16, e.g. 8 or 24)
            run their training backward through the NCHW kernel (:func:`~lightning_eff.training.layout.nchw_batchnorm_backward`; training
            step 0.93x on ``make train``'s network); ``"native"``: ATen's channels-last kernel everywhere.
        inplace_activations: ``"auto"``: while training, the activations whose in-place form clones its input
            under autograd (``ReLU6``, ``Hardswish``, ``SiLU``, ...) run out of place (bitwise the same results,
            one copy fewer each; :func:`~lightning_eff.training.layout.out_of_place_activations`), switched back
            when training ends; ``"keep"``: their flags stay as the network has them.
        module_attr: attribute of the LightningModule holding the network.

    Besides the layout, the callback owns the two costs a channels-last training step pays for nothing on CPU
    (both measured and explained in :mod:`lightning_eff.training.layout`), and puts everything back when
    training ends.
    """

    _MARK = "_lightning_eff_channels_last"

    def __init__(self, inputs: bool = True, batchnorm_backward: str = "auto", inplace_activations: str = "auto",
                 module_attr: str | None = DEFAULT_MODULE_ATTR) -> None:
        super().__init__(module_attr)
        self.inputs = check_bool("inputs", inputs)
        self.batchnorm_backward = check_batchnorm_backward(batchnorm_backward)
        self.inplace_activations = check_inplace_activations(inplace_activations)
        self._handles: list[Any] = []

    @property
    def state_key(self) -> str:  # noqa: D102
        return self.state_key_of(inputs=self.inputs, module_attr=self.module_attr)

    def _ensure(self, pl_module: L.LightningModule) -> None:
        net = self.network(pl_module)
        owner = net.__dict__.get(self._MARK)
        if owner == self.state_key:
            return
        if owner is not None:
            raise ConfigError(f"ChannelsLast: the network ({type(net).__name__}) is already converted by another "
                              "ChannelsLast callback; attach one.")
        handle = to_channels_last(net, inputs=self.inputs, batchnorm_backward=self.batchnorm_backward,
                                  inplace_activations=self.inplace_activations)
        if handle is not None:
            self._handles.append(handle)
        net.__dict__[self._MARK] = self.state_key
        rerouted, out_of_place = (handle.rerouted, len(handle.switched)) if handle is not None else ([], 0)
        log.info("ChannelsLast: %s in NHWC%s%s%s", type(net).__name__, " (inputs converted on entry)" if self.inputs else "",
                 f"; {out_of_place} activations out of place while training (in place they copy their input)"
                 if out_of_place else "",
                 f"; {len(rerouted)} BatchNorm(s) with a channel count on ATen's slow channels-last backward path "
                 f"train their backward in NCHW (with more than one thread; {torch.get_num_threads()} now): "
                 f"{rerouted[:4]}{' ...' if len(rerouted) > 4 else ''}"
                 if rerouted else "")

    # QAT may replace the network in its setup: every loop start checks the network is the converted one.
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._ensure(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._ensure(pl_module)

    on_test_start = on_predict_start = on_validation_start

    def _restore(self, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        net = self.network(pl_module)
        if net.__dict__.pop(self._MARK, None) is not None:
            net.to(memory_format=torch.contiguous_format)

    # Back to NCHW when training ends, before the end-of-fit work: int8 calibration and kernels are several
    # times slower on NHWC tensors (measured: PTQ calibration 5x, x86 int8 forward 7x), and conversion, export
    # and the report then see the network as it was given (Export(channels_last=True) writes NHWC graphs).
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._restore(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._restore(pl_module)

    on_predict_end = on_test_end

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.state.fn != "fit":  # a validate() on its own; inside fit the layout stays until training ends
            self._restore(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:  # noqa: D102
        self._restore(pl_module)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"version": 1}
