"""Pre-flight checks for FX quantization: catch at setup what upstream reports after training.

RELIABILITY.md item 5: a model that cannot be traced, an ``nn.Embedding`` given the activation
qconfig, or an engine name with a typo fail upstream only at ``prepare``/``convert`` time, after
hours of training, with messages that do not name the module. These checks run in a fraction of
a second on the model the user passes and name the module that needs attention.

Example:
    >>> check_engine("qnnpak")
    Traceback (most recent call last):
    ...
    lightning_eff.errors.ConfigError: engine='qnnpak' is not supported; choose one of ['x86', ...Did you mean 'qnnpack'?
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from lightning_eff.compression.quantization.engines import (  # noqa: F401  (re-exported: engines own them)
    KNOWN_ENGINES,
    check_engine,
    int8_kernels_allowed,
    quantized_engine,
    supported_engines,
)
from lightning_eff.errors import ConfigError

__all__ = [
    "int8_kernels_allowed",
    "supported_engines",
    "check_engine",
    "quantized_engine",
    "check_traceable",
    "check_embeddings",
    "check_quantizable",
    "sqnr_db",
]

#: Engines the FX flow knows qconfigs and backend configs for (torch.ao's list).




def _module_stack_tracer():
    """A QuantizationTracer that remembers which module was being traced when tracing failed."""
    from torch.ao.quantization.fx.tracer import QuantizationTracer

    class _Tracer(QuantizationTracer):
        def call_module(self, m, forward, args, kwargs):
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception as err:
                if not hasattr(err, "_lightning_eff_module"):  # innermost module raises first
                    try:
                        name = self.path_of_module(m) or "<root>"
                    except Exception:
                        name = "<root>"
                    with contextlib.suppress(AttributeError):
                        err._lightning_eff_module = name
                raise

    return _Tracer(skipped_module_names=[], skipped_module_classes=[])


def check_traceable(model: nn.Module) -> torch.fx.Graph:
    """Symbolically trace ``model`` with the tracer FX quantization uses.

    Returns:
        The traced graph (so callers can inspect it).

    Raises:
        ConfigError: naming the innermost module whose ``forward`` could not be traced (data
            dependent control flow, ``len(x)``, non-torch calls), with the tracer's message and
            the usual fixes.
    """
    tracer = _module_stack_tracer()
    try:
        return tracer.trace(model)
    except Exception as err:
        where = getattr(err, "_lightning_eff_module", "<root>")
        cls = type(model.get_submodule(where)).__name__ if where != "<root>" else type(model).__name__
        raise ConfigError(
            f"model is not FX-traceable: tracing module {where!r} ({cls}) failed with "
            f"{type(err).__name__}: {err}. Fix: make that forward free of data-dependent Python control "
            "flow, mark the module non-traceable (prepare_custom_config 'non_traceable_module_name'), or "
            "use the pt2e path (prepare_pt2e_model), which traces through torch.export."
        ) from err


def _is_weight_only_qconfig(qconfig: Any) -> bool:
    """True when a qconfig quantizes only the weight with float qparams (what embeddings need)."""
    if qconfig is None:
        return True  # not quantized at all: fine
    act = qconfig.activation()
    weight = qconfig.weight()
    act_is_placeholder = type(act).__name__ in ("PlaceholderObserver", "NoopObserver")
    return act_is_placeholder and getattr(weight, "qscheme", None) == torch.per_channel_affine_float_qparams


def check_embeddings(model: nn.Module, qconfig_mapping: Any) -> list[str]:
    """Check every ``nn.Embedding/EmbeddingBag`` gets a weight-only float-qparams qconfig.

    Returns:
        Names of the embedding modules found (all valid).

    Raises:
        ConfigError: naming the embedding that would get the activation qconfig (upstream fails
            at prepare/convert with an assertion that names neither module nor fix).
    """
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            continue
        names.append(name)
        qconfig = _qconfig_for(qconfig_mapping, name, mod)
        if not _is_weight_only_qconfig(qconfig):
            raise ConfigError(
                f"module {name!r} ({type(mod).__name__}) would be quantized with the activation qconfig; embeddings "
                "need weight-only float-qparams quantization. Fix: "
                "qconfig_mapping.set_object_type(nn.Embedding, torch.ao.quantization.float_qparams_weight_only_qconfig) "
                "(default_embedding_qat_qconfig for QAT), or set it to None to keep the embedding in float."
            )
    return names


def _qconfig_for(mapping: Any, name: str, mod: nn.Module) -> Any:
    """The qconfig the mapping gives ``name`` (module-name > object-type > global precedence)."""
    if name in mapping.module_name_qconfigs:
        return mapping.module_name_qconfigs[name]
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):  # parent module names apply to children
        prefix = ".".join(parts[:i])
        if prefix in mapping.module_name_qconfigs:
            return mapping.module_name_qconfigs[prefix]
    if type(mod) in mapping.object_type_qconfigs:
        return mapping.object_type_qconfigs[type(mod)]
    return mapping.global_qconfig


def check_quantizable(model: nn.Module, example_inputs: Any = None, engine: str = "x86", *, qconfig_mapping: Any = None) -> dict:
    """Run every pre-flight check and return a small report.

    Args:
        model: the float model to be quantized.
        example_inputs: if given, the model is run once in eval mode on them (a shape error is
            cheaper to see now than after ``prepare``).
        engine: target quantized engine.
        qconfig_mapping: the mapping that will be used; default is the engine's default.

    Returns:
        ``{"engine", "traced_nodes", "embeddings"}``.

    Raises:
        ConfigError: engine typo/unavailable, untraceable module, or embedding without a
            weight-only qconfig, each naming the culprit.
    """
    check_engine(engine)
    if qconfig_mapping is None:
        from torch.ao.quantization import get_default_qconfig_mapping

        qconfig_mapping = get_default_qconfig_mapping(engine)
    graph = check_traceable(model)
    embeddings = check_embeddings(model, qconfig_mapping)
    if example_inputs is not None:
        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(*inputs)
        except Exception as err:
            raise ConfigError(f"the model fails on example_inputs before quantization: {type(err).__name__}: {err}") from err
        finally:
            model.train(was_training)
    return {"engine": engine, "traced_nodes": len(graph.nodes), "embeddings": embeddings}


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB.

    A quality gate for int8 models: > 30 dB means the noise is ~3% of the signal; ``inf`` when equal.

    Raises:
        ConfigError: shape mismatch.
    """
    ref = reference.dequantize() if reference.is_quantized else reference
    tst = test.dequantize() if test.is_quantized else test
    if ref.shape != tst.shape:
        raise ConfigError(f"sqnr_db: shapes differ, reference {tuple(ref.shape)} vs test {tuple(tst.shape)}.")
    ref, tst = ref.detach().double(), tst.detach().double()
    noise = (ref - tst).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
