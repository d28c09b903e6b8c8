"""pt2e quantization (torch.export + torchao + ExecuTorch's XNNPACKQuantizer): the maintained path.

``torch.ao.quantization`` (eager/FX) is deprecated upstream and its int8 models cannot be
``torch.export``-ed (``__obj_flatten__`` error, RELIABILITY.md), so ExecuTorch ``.pte`` files
need this flow:

``torch.export.export(model, inputs).module()`` -> ``prepare_qat_pt2e`` / ``prepare_pt2e``
(annotations from ``XNNPACKQuantizer``, symmetric int8, per-channel weights) -> train or
calibrate -> ``convert_pt2e`` -> :func:`lightning_eff.export.export_executorch`.

The quantizer works on ATen ops, so timm's ``BatchNormAct2d`` needs no rewrite here: conv,
batch_norm and relu/hardtanh appear as separate ops and XNNPACK's patterns fold BN and fuse the
clamp. Import paths checked in the installed packages (torchao 0.18.0, executorch 1.5.1):
``torchao.quantization.pt2e.quantize_pt2e.{prepare_pt2e, prepare_qat_pt2e, convert_pt2e}``,
``torchao.quantization.pt2e.{move_exported_model_to_train, move_exported_model_to_eval}``,
``executorch.backends.xnnpack.quantizer.xnnpack_quantizer.{XNNPACKQuantizer,
get_symmetric_quantization_config}``.

Example:
    >>> from lightning_eff.models import create_model
    >>> x = torch.randn(2, 1, 32, 32)
    >>> prepared = prepare_pt2e_model(create_model("mobilenetv2_tiny", depth=0.3), (x,), qat=True)
    >>> prepared(x).sum().backward()                  # QAT step
    >>> int8 = convert_pt2e_model(prepared)           # a copy; prepared still trains
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_eff.batch import input_args as _inputs
from lightning_eff.errors import ConfigError, ExportUnavailableError
from lightning_eff.validation import check_bool

__all__ = ["pt2e_available", "xnnpack_quantizer", "prepare_pt2e_model", "convert_pt2e_model", "set_pt2e_training", "is_pt2e_quantized"]

_MISSING = (
    "the pt2e path needs torchao and executorch (pip install 'lightning_eff[export]', i.e. "
    "torchao==0.18.0 executorch==1.5.1); the legacy FX path (prepare_qat_fx_model) works without them"
)


def pt2e_available() -> bool:
    """True when torchao's pt2e API and ExecuTorch's XNNPACK quantizer import."""
    try:
        _imports()
    except ExportUnavailableError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- pattern cache
_PATTERN_CACHE: dict[Any, Any] = {}
_PATTERN_MODULES = (  # the modules that bind torchao's pattern tracer to a global name of their own
    "torchao.quantization.pt2e.utils",
    "torchao.quantization.pt2e.qat_utils",
    "torchao.quantization.pt2e.reference_representation_rewrite",
    "executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils",
)


def _pattern_key(pattern: Any, example_inputs: tuple, is_cuda: bool, kwargs: dict) -> Any:
    """A hashable description of one pattern trace, or ``None`` when it cannot be described safely."""
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype, value.device.type)
        if isinstance(value, (bool, int, float, str, type(None))) or callable(value):
            return value
        if isinstance(value, (tuple, list)):
            return tuple(describe(v) for v in value)
        raise TypeError(type(value).__name__)

    fn = pattern
    if isinstance(pattern, nn.Module):  # torchao wraps each pattern function in a WrapperModule(fn)
        if type(pattern).__name__ != "WrapperModule" or next(pattern.parameters(), None) is not None \
                or next(pattern.buffers(), None) is not None or next(pattern.children(), None) is not None:
            return None
        fn = getattr(pattern, "fn", None)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    captured = [c.cell_contents for c in (fn.__closure__ or ())]
    if any(isinstance(v, torch.Tensor) for v in captured):
        return None  # a captured tensor is a constant of the graph: its values matter
    try:
        cells = tuple(describe(v) for v in captured)
        key = (code, cells, describe(tuple(example_inputs)), bool(is_cuda),
               tuple(sorted((k, describe(v)) for k, v in kwargs.items())))
        hash(key)
    except (TypeError, ValueError):
        return None
    return key


def _cached_pattern_tracer(trace: Any) -> Any:
    """torchao's ``_get_aten_graph_module_for_pattern``, remembering each traced pattern.

    torchao traces the same small patterns (conv-bn, conv-bn-relu, quantize/dequantize variants) with
    ``torch.export`` on every ``prepare``/``convert``: about 0.5 s each here, 100+ of them in one pt2e QAT
    ``convert``. The graph depends only on the pattern function (its code and captured flags), the
    example shapes/dtypes and ``is_cuda``, so the first trace is kept and each call gets a fresh copy of
    its graph (callers edit the graph they receive). ``LIGHTNING_EFF_PT2E_PATTERN_CACHE=0`` turns it off.
    """
    def traced(pattern, example_inputs, is_cuda=False, **kwargs):
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return trace(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERN_CACHE:
            _PATTERN_CACHE[key] = trace(pattern, example_inputs, is_cuda, **kwargs)
        cached = _PATTERN_CACHE[key]
        return torch.fx.GraphModule(cached, copy.deepcopy(cached.graph), class_name=type(cached).__name__)

    traced.__wrapped__ = trace
    return traced


_PATTERN_CACHE_INSTALLED = False


def _install_pattern_cache() -> None:
    """Wrap torchao's pattern tracer in :func:`_cached_pattern_tracer` (once per process)."""
    import importlib
    import os

    global _PATTERN_CACHE_INSTALLED
    if _PATTERN_CACHE_INSTALLED or os.environ.get("LIGHTNING_EFF_PT2E_PATTERN_CACHE", "1") == "0":
        return
    _PATTERN_CACHE_INSTALLED = True
    for name in _PATTERN_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        current = getattr(module, "_get_aten_graph_module_for_pattern", None)
        if current is not None and not hasattr(current, "__wrapped__"):
            module._get_aten_graph_module_for_pattern = _cached_pattern_tracer(current)


def _imports():
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e import (
            allow_exported_model_train_eval,
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )
        from torchao.quantization.pt2e.quantize_pt2e import (
            convert_pt2e,
            prepare_pt2e,
            prepare_qat_pt2e,
        )
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ExportUnavailableError(f"{_MISSING} ({err}).") from err
    _install_pattern_cache()
    return {
        "XNNPACKQuantizer": XNNPACKQuantizer,
        "get_symmetric_quantization_config": get_symmetric_quantization_config,
        "prepare_pt2e": prepare_pt2e,
        "prepare_qat_pt2e": prepare_qat_pt2e,
        "convert_pt2e": convert_pt2e,
        "to_train": move_exported_model_to_train,
        "to_eval": move_exported_model_to_eval,
        "allow_train_eval": allow_exported_model_train_eval,
    }


def xnnpack_quantizer(*, qat: bool, per_channel: bool = True):
    """``XNNPACKQuantizer`` with the symmetric int8 config (per-channel weights by default)."""
    api = _imports()
    config = api["get_symmetric_quantization_config"](is_per_channel=per_channel, is_qat=qat)
    return api["XNNPACKQuantizer"]().set_global(config)


def prepare_pt2e_model(
    model: nn.Module,
    example_inputs: Any,
    *,
    qat: bool = True,
    per_channel: bool = True,
    dynamic_shapes: Any = None,
    quantizer: Any = None,
) -> torch.fx.GraphModule:
    """Export ``model`` and insert pt2e fake-quant (QAT) or observers (PTQ).

    Args:
        model: float model (not modified).
        example_inputs: tensor or tuple for ``torch.export``.
        qat: ``True`` -> ``prepare_qat_pt2e`` and the result is in train mode; ``False`` ->
            ``prepare_pt2e`` in eval mode, ready for calibration batches.
        per_channel: per-channel symmetric weights.
        dynamic_shapes: forwarded to ``torch.export.export`` (e.g. a dynamic batch dim).
        quantizer: a custom pt2e ``Quantizer`` instead of XNNPACK's.

    Returns:
        The prepared ``GraphModule``. ``.train()``/``.eval()`` are re-routed to torchao's
        ``move_exported_model_to_train/eval`` (exported graphs bake dropout/BN behaviour into
        ops; only those ops switch, Python branches on ``self.training`` were fixed at export).

    Raises:
        ExportUnavailableError: torchao/executorch missing.
        ConfigError: bad option, or ``torch.export`` failed (message names the reason).
    """
    check_bool("qat", qat)
    check_bool("per_channel", per_channel)
    api = _imports()
    inputs = _inputs(example_inputs)
    quantizer = quantizer if quantizer is not None else xnnpack_quantizer(qat=qat, per_channel=per_channel)
    work = copy.deepcopy(model)
    work.train(qat)
    try:
        graph = torch.export.export(work, inputs, dynamic_shapes=dynamic_shapes).module()
    except Exception as err:
        raise ConfigError(
            f"torch.export could not capture the model for pt2e quantization: {type(err).__name__}: {err}. "
            "Fix the data-dependent code it names, or use the FX path (prepare_qat_fx_model)."
        ) from err
    prepared = api["prepare_qat_pt2e"](graph, quantizer) if qat else api["prepare_pt2e"](graph, quantizer)
    # Lightning (and users) call .train()/.eval(); exported graphs refuse that unless allowed,
    # and then switch the special ops (dropout, batch norm) the way set_pt2e_training does.
    api["allow_train_eval"](prepared)
    return set_pt2e_training(prepared, qat)


def set_pt2e_training(model: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
    """Switch an exported/pt2e graph between train and eval behaviour (dropout, batch norm).

    ``nn.Module.train()`` does not change exported graphs; torchao rewrites the ops instead.
    Also sets ``model.training`` so Lightning-style checks see the right flag.
    """
    check_bool("mode", mode)
    api = _imports()
    (api["to_train"] if mode else api["to_eval"])(model)
    model.training = mode
    return model


def is_pt2e_quantized(model: torch.fx.GraphModule) -> bool:
    """True when the graph contains quantize/dequantize ops (i.e. it went through ``convert_pt2e``)."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return False
    return any("quantize_per" in str(n.target) for n in graph.nodes if n.op == "call_function")


def convert_pt2e_model(prepared: torch.fx.GraphModule, *, inplace: bool = False) -> torch.fx.GraphModule:
    """Convert a prepared pt2e graph to its quantized (Q/DQ) form, on a copy by default.

    The result is in eval mode and is what ``export_executorch`` lowers to XNNPACK int8
    kernels. Keeping ``prepared`` intact lets QAT continue after an intermediate export.

    Raises:
        ExportUnavailableError: torchao missing.
    """
    api = _imports()
    target = prepared if inplace else copy.deepcopy(prepared)
    set_pt2e_training(target, False)
    converted = api["convert_pt2e"](target)
    api["allow_train_eval"](converted)
    converted.training = False
    return converted
