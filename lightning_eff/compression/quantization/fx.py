"""FX graph-mode quantization (QAT, static PTQ, dynamic) for TorchScript / lite-interpreter targets.

The flow, for any conv net (timm models included):

1. :func:`~lightning_eff.compression.quantization.fusion.fuse_for_quantization` splits timm's
   norm+act modules and swaps ReLU6 so the Conv-BN-ReLU patterns match;
2. ``prepare_qat_fx`` (QAT, Jacob et al. 2018) or ``prepare_fx`` (PTQ) inserts fake-quant /
   observers with the engine's default qconfig mapping, adjusted by our options, and the
   engine's own ``BackendConfig`` (x86 / fbgemm / qnnpack / onednn);
3. training or :func:`calibrate`;
4. :func:`convert_fx_model` builds the int8 model on a *copy*: the prepared model stays
   trainable (Lightning #7427 / #12896 converted in place and broke further training).

``torch.ao.quantization`` is deprecated upstream but works on the pinned torch 2.14.1; the
maintained path for ExecuTorch is :mod:`~lightning_eff.compression.quantization.pt2e`.

Example:
    >>> from lightning_eff.models import create_model
    >>> x = torch.randn(2, 1, 32, 32)
    >>> prepared = prepare_qat_fx_model(create_model("mobilenetv2_tiny"), (x,), engine="x86")
    >>> prepared(x).sum().backward()          # train as usual
    >>> int8 = convert_fx_model(prepared)     # prepared is untouched
    >>> int8(x).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.ao.quantization.fake_quantize import FusedMovingAvgObsFakeQuantize

from lightning_eff.batch import input_args as _inputs
from lightning_eff.compression.quantization.engines import (  # noqa: F401  (re-exported)
    ENGINE_ATTR,
    model_engine,
    set_model_engine,
)
from lightning_eff.compression.quantization.fusion import (
    QNNPACK_CLAMP_FUNCTIONS,
    ContiguousHardtanh,
    after_contiguous,
    fix_qnnpack_clamps,
    fuse_for_quantization,
    guard_zero_bn_weights,
    remove_identities,
)
from lightning_eff.compression.quantization.preflight import (
    check_embeddings,
    check_engine,
    check_quantizable,
    quantized_engine,
    sqnr_db,
    supported_engines,
)
from lightning_eff.errors import ConfigError, NoEffectWarning
from lightning_eff.naming import record_float_keys, tensor_names
from lightning_eff.validation import check_bool, check_choice

__all__ = [
    "OBSERVERS",
    "PER_CHANNEL",
    "check_per_channel",
    "depthwise_conv_names",
    "build_qconfig_mapping",
    "backend_config_for",
    "prepare_qat_fx_model",
    "prepare_ptq_fx_model",
    "calibrate",
    "convert_fx_model",
    "set_fake_quant",
    "set_observers",
    "freeze_bn_stats",
    "fold_batch_norms",
    "dynamic_quantize",
    "sqnr_db",
    "quantized_engine",
    "supported_engines",
    "check_quantizable",
    "model_engine",
    "default_reduce_range",
    "remove_identities",
    "ContiguousHardtanh",
    "NHWCFusedFakeQuantize",
]

OBSERVERS = ("minmax", "moving_average", "histogram")
#: Attribute stored on prepared / converted models so convert and export know the engine.
#: ``per_channel`` choices: every weight per output channel, none, or depthwise convolutions only
PER_CHANNEL = (True, False, "depthwise")


def check_per_channel(value: Any, option: str = "per_channel") -> bool | str:
    """``True``, ``False`` or ``"depthwise"`` (per-channel scales only where a channel has few weights).

    Per-channel scales cost 16 bytes per output channel in a TorchScript artifact (float64 scale +
    int64 zero point): 1.8 bytes per weight of a 3x3 depthwise filter (9 weights), where they also
    matter most for accuracy (folded BN spreads channel ranges widely), but only ~0.1 bytes per weight
    of a 1x1 convolution over 128+ inputs. ``"depthwise"`` keeps them where they pay.
    """
    if any(value is choice if isinstance(choice, bool) else value == choice for choice in PER_CHANNEL):
        return value
    raise ConfigError(f"{option}={value!r} is not valid; choose one of {list(PER_CHANNEL)}.")


def depthwise_conv_names(model: nn.Module) -> list[str]:
    """Paths of the depthwise convolutions (``groups == in_channels > 1``) of ``model``."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]


def _observer_cls(observer: str, per_channel: bool, weight: bool):
    from torch.ao.quantization import observer as obs

    if weight:
        # Weights are static within a step: min/max of the current tensor is exact; moving
        # averages or histograms only lag behind. Histogram has no per-channel variant.
        return obs.PerChannelMinMaxObserver if per_channel else obs.MinMaxObserver
    return {"minmax": obs.MinMaxObserver, "moving_average": obs.MovingAverageMinMaxObserver, "histogram": obs.HistogramObserver}[observer]


def default_reduce_range(engine: str) -> bool:
    """Whether activations should use 7 bits (``reduce_range``) on ``engine`` on this CPU.

    x86/fbgemm/onednn int8 kernels without VNNI multiply u8 x s8 pairs into saturating int16
    sums (``vpmaddubsw``); full-range activations overflow them. Measured on a CPU without VNNI
    (torch 2.14.1, one 3x3 conv, 16 channels): x86 31 dB SQNR with reduce_range, 17 dB without;
    onednn the same. torch defaults onednn to the full range, which is only safe with VNNI, so
    we check the CPU. qnnpack accumulates in int32 and always uses the full range (37 dB).
    """
    if engine == "qnnpack":
        return False
    if engine == "onednn":
        vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
        return not vnni
    return True


class NHWCFusedFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """torch.ao's fused observe+fake-quantize, without its copy of a channels-last input.

    The CPU kernel (``fused_moving_avg_obs_fake_quant``) makes its input contiguous first: for an NHWC
    activation (``ChannelsLast`` QAT) that is a full NCHW copy on every call, measured 1.25 of 7.1 ms for a
    [128, 96, 16, 16] batch. Per-tensor fake quantization is element-wise with one min/max over all elements,
    so it runs on the NHWC *view* of the same memory (``permute(0, 2, 3, 1)``, contiguous) and permutes back:
    output, gradient, observer statistics, scale and zero point are bitwise those of the copy. Per-channel
    weights and every other layout take the parent's path unchanged; state-dict keys are the parent's.
    """

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803 - the parent's signature
        if (not self.is_per_channel and X.dim() == 4 and not X.is_contiguous()
                and X.is_contiguous(memory_format=torch.channels_last)):
            return self._fused(X.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self._fused(X)

    def _fused(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803
        # The parent's forward, spelled out: TorchScript (a scripted fake-quant graph) cannot call super().
        return torch.fused_moving_avg_obs_fake_quant(
            X, self.observer_enabled, self.fake_quant_enabled, self.activation_post_process.min_val,
            self.activation_post_process.max_val, self.scale, self.zero_point,
            self.activation_post_process.averaging_constant, self.activation_post_process.quant_min,
            self.activation_post_process.quant_max, self.ch_axis, self.is_per_channel, self.is_symmetric_quant)


def _make_qconfig(engine: str, *, qat: bool, per_channel: bool, observer: str, reduce_range: bool | None = None):
    """One QConfig following the engine's defaults (dtype, ranges, reduce_range) with our choices."""
    from torch.ao.quantization import FakeQuantize, QConfig

    if reduce_range is None:
        reduce_range = default_reduce_range(engine)
    act_obs = _observer_cls(observer, per_channel, weight=False)
    w_obs = _observer_cls(observer, per_channel, weight=True)
    w_kwargs = dict(dtype=torch.qint8, quant_min=-128, quant_max=127)
    if per_channel:
        w_kwargs.update(qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        w_kwargs.update(qscheme=torch.per_tensor_symmetric)
    if qat:
        # The fused observe+fake-quant kernel only supports moving-average min/max; other
        # observers go through the generic FakeQuantize wrapper (slower, but the user asked).
        if observer == "moving_average":
            act = NHWCFusedFakeQuantize.with_args(
                observer=act_obs, quant_min=0, quant_max=255, dtype=torch.quint8, reduce_range=reduce_range
            )
        else:
            act = FakeQuantize.with_args(observer=act_obs, quant_min=0, quant_max=255, dtype=torch.quint8, reduce_range=reduce_range)
        w_ma = torch.ao.quantization.MovingAveragePerChannelMinMaxObserver if per_channel else torch.ao.quantization.MovingAverageMinMaxObserver
        weight = NHWCFusedFakeQuantize.with_args(observer=w_ma, **w_kwargs)
        return QConfig(activation=act, weight=weight)
    act = act_obs.with_args(dtype=torch.quint8, reduce_range=reduce_range)
    return QConfig(activation=act, weight=w_obs.with_args(**w_kwargs))


def build_qconfig_mapping(
    engine: str = "x86",
    *,
    qat: bool = True,
    per_channel: bool = True,
    observer: str = "moving_average",
    reduce_range: bool | None = None,
):
    """The engine's default ``QConfigMapping`` with our observer / granularity choices.

    ``reduce_range=None`` picks :func:`default_reduce_range` (7-bit activations where the int8
    kernels would otherwise saturate int16 accumulators).

    Starts from ``get_default_qat_qconfig_mapping(engine)`` (or the PTQ one), which also carries
    the special entries (fixed-qparams ops such as sigmoid/hardsigmoid, reshape, layer norm,
    transposed convs), and replaces the global qconfig everywhere it was used. Embeddings get a
    weight-only float-qparams qconfig, the only one their quantized kernels accept.

    Raises:
        ConfigError: unknown engine/observer.
    """
    from torch.ao.quantization import (
        QConfig,
        default_embedding_qat_qconfig,
        float_qparams_weight_only_qconfig,
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
    )

    check_engine(engine)
    check_choice("observer", observer, OBSERVERS)
    check_bool("per_channel", per_channel)  # "depthwise" needs the model: see prepare_qat_fx_model
    if reduce_range is not None:
        check_bool("reduce_range", reduce_range)
    base = get_default_qat_qconfig_mapping(engine) if qat else get_default_qconfig_mapping(engine)
    ours = _make_qconfig(engine, qat=qat, per_channel=per_channel, observer=observer, reduce_range=reduce_range)
    old = base.global_qconfig
    base.set_global(ours)
    for pattern, qc in list(base.object_type_qconfigs.items()):
        if qc is old:
            base.set_object_type(pattern, ours)
        elif qc is not None and qc.activation is old.activation:
            # transposed convs / layer norm keep their special weight config, take our activation
            base.set_object_type(pattern, QConfig(activation=ours.activation, weight=qc.weight))
    emb = default_embedding_qat_qconfig if qat else float_qparams_weight_only_qconfig
    base.set_object_type(nn.Embedding, emb).set_object_type(nn.EmbeddingBag, emb)
    return base


def backend_config_for(engine: str):
    """The FX ``BackendConfig`` of an engine (which patterns fuse, which dtypes are legal)."""
    from torch.ao.quantization import backend_config as bc
    from torch.ao.quantization.backend_config.x86 import get_x86_backend_config

    check_engine(engine)
    return {
        "x86": get_x86_backend_config,
        "fbgemm": bc.get_fbgemm_backend_config,
        "qnnpack": bc.get_qnnpack_backend_config,
        "onednn": bc.get_onednn_backend_config,
    }[engine]()


def fold_batch_norms(model: nn.Module, engine: str = "x86", *, inplace: bool = False) -> torch.fx.GraphModule:
    """Fold every BatchNorm that follows a convolution (or linear layer) into it, in eval mode.

    torch.ao's eval-mode fusion with ``engine``'s ``BackendConfig``: Conv-BN(-ReLU) becomes
    Conv(-ReLU) with ``W' = W * gamma / sqrt(var + eps)`` and the matching bias, from the running
    statistics; each fused module keeps the conv's name. Run :func:`fuse_for_quantization` first
    on a timm model (it splits ``BatchNormAct2d`` so the patterns match). Returns a new
    ``GraphModule`` in eval mode; a BatchNorm that follows no foldable layer stays (a warning names it).
    ``model`` is left as it was (mode included) unless ``inplace=True``, which saves the copy. The new
    bias of a conv that had none (it carries BN's shift) trains whenever the conv's weight does.
    """
    from torch.ao.quantization.quantize_fx import fuse_fx

    check_engine(engine)
    check_bool("inplace", inplace)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    trainable = {n: m.weight.requires_grad for n, m in model.named_modules() if isinstance(m, layers) and m.bias is None}
    with quantized_engine(engine):
        folded = fuse_fx(model, backend_config=backend_config_for(engine))
    for name, mod in folded.named_modules():
        # torch.ao creates the bias of a bias-free conv as Parameter(requires_grad=False) (it copies the
        # requires_grad of the zeros it starts from): the folded BN shift would never train.
        key = name if name in trainable else name.removesuffix(".0")  # a fused Conv-ReLU holds its conv at [0]
        if isinstance(mod, layers) and key in trainable and mod.bias is not None:
            mod.bias.requires_grad_(trainable[key])
    left = [n for n, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        warnings.warn(f"fold_bn: BatchNorm layers {left[:5]} follow no convolution or linear layer and stay "
                      "(they keep training their statistics).", NoEffectWarning, stacklevel=3)
    return folded


def _prepare(model, example_inputs, *, qat, engine, per_channel, observer, relu6, fuse, inplace, qconfig_mapping, check, reduce_range,
             fold_bn=False):
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    check_engine(engine)
    check_choice("observer", observer, OBSERVERS)
    check_choice("relu6", relu6, ["relu", "keep"])
    check_per_channel(per_channel)
    for name, val in (("fuse", fuse), ("inplace", inplace), ("check", check), ("fold_bn", fold_bn)):
        check_bool(name, val)
    inputs = _inputs(example_inputs)
    if qconfig_mapping is None:
        mapping = build_qconfig_mapping(engine, qat=qat, per_channel=per_channel is True, observer=observer, reduce_range=reduce_range)
    else:
        mapping = qconfig_mapping
    if check:
        check_quantizable(model, inputs, engine, qconfig_mapping=mapping)
    else:
        check_embeddings(model, mapping)
    training = model.training
    original = None
    if not inplace:  # one copy up front: fusion and prepare then move the same tensor objects, so their names are traceable
        original, model = model, copy.deepcopy(model)
    names = tensor_names(model)
    if fuse:  # the untouched original is the equivalence check's reference: no second copy
        model = fuse_for_quantization(model, relu6=relu6, example_inputs=inputs, check=check, inplace=True, reference=original)
    if per_channel == "depthwise" and qconfig_mapping is None:
        depthwise = _make_qconfig(engine, qat=qat, per_channel=True, observer=observer, reduce_range=reduce_range)
        for name in depthwise_conv_names(model):  # a fused Conv-BN(-ReLU) keeps the conv's name
            mapping.set_module_name(name, depthwise)
    if fold_bn:  # after the depthwise names: a fused module keeps its conv's name
        model = fold_batch_norms(model, engine, inplace=True)  # model is already _prepare's copy
    if engine == "qnnpack":
        fix_qnnpack_clamps(model)
    if qat and not fold_bn:
        guard_zero_bn_weights(model)
    with quantized_engine(engine):
        if qat:
            model.train()
            prepared = prepare_qat_fx(model, mapping, inputs, backend_config=backend_config_for(engine))
        else:
            model.eval()
            prepared = prepare_fx(model, mapping, inputs, backend_config=backend_config_for(engine))
    if engine == "qnnpack":
        bad = [
            n.name
            for n in prepared.graph.nodes
            if n.op in ("call_function", "call_method") and n.target in QNNPACK_CLAMP_FUNCTIONS and not after_contiguous(n)
        ]
        if bad:
            warnings.warn(
                f"engine='qnnpack': functional clamp/relu6/hardtanh calls {bad[:5]} will run on channels-last int8 "
                "tensors, which QNNPACK computes wrongly in this torch build; replace them by nn.ReLU6/nn.Hardtanh "
                "modules or use engine='x86'. Check the converted model with sqnr_db.",
                UserWarning,
                stacklevel=3,
            )
    prepared.train(training if qat else False)
    set_model_engine(prepared, engine)
    record_float_keys(prepared, names)  # fused conv.bn.* -> the float network's bn.*, for artifacts users reload
    return prepared


def prepare_qat_fx_model(
    model: nn.Module,
    example_inputs: Any,
    *,
    engine: str = "x86",
    per_channel: bool = True,
    observer: str = "moving_average",
    reduce_range: bool | None = None,
    relu6: str = "relu",
    fuse: bool = True,
    inplace: bool = False,
    qconfig_mapping: Any = None,
    check: bool = True,
    fold_bn: bool = False,
) -> torch.fx.GraphModule:
    """Fuse, then insert QAT fake-quantization (``prepare_qat_fx``) for ``engine``.

    Args:
        model: float model (train or eval mode; the result keeps the mode).
        example_inputs: tensor or tuple used for tracing and the fusion check.
        engine: ``"x86" | "fbgemm" | "qnnpack" | "onednn"`` (see :func:`supported_engines`).
        per_channel: per-output-channel symmetric int8 weights (better accuracy, same speed);
            ``"depthwise"``: per-channel for depthwise convolutions only, per-tensor elsewhere
            (smaller artifacts, see :func:`check_per_channel`).
        observer: activation range estimator: ``"moving_average"`` (default, uses the fused
            observe+fake-quant kernel), ``"minmax"`` or ``"histogram"`` (slow in QAT). Weights
            always use min/max of the current tensor (exact for static weights).
        reduce_range: 7-bit activations; ``None`` = the engine's default (see
            :func:`build_qconfig_mapping`).
        relu6: ``"relu"`` (fast, torchvision's choice) or ``"keep"``; see ``fusion.py``.
        fuse: run :func:`fuse_for_quantization` first (turn off only for pre-fused models).
        inplace: let fusion modify ``model`` instead of a copy.
        qconfig_mapping: a full ``QConfigMapping`` overriding engine/per_channel/observer.
        check: run the pre-flight and the fusion equivalence check.
        fold_bn: fold BatchNorm into the convolutions *before* QAT (:func:`fold_batch_norms`, from
            the running statistics) instead of torch.ao's fused Conv-BN QAT modules, which compute
            batch statistics, a rescaled conv and a division by the BN scale on every step. The
            network then fine-tunes without BatchNorm (what the int8 model runs): a QAT step costs
            about 0.65x (MobileNetV2 w0.5, 32 px, batch 128, 2 threads), for fine-tuning a trained
            model. The prepared graph's keys are the folded convs' (``float_state_dict`` of it has
            no BatchNorm entries).

    Returns:
        The prepared ``GraphModule`` (trainable; the engine is stored on it).

    Raises:
        ConfigError: bad option, engine typo, untraceable module, embedding without a suitable
            qconfig, or a fusion rewrite that changed outputs.
    """
    return _prepare(model, example_inputs, qat=True, engine=engine, per_channel=per_channel, observer=observer,
                    relu6=relu6, fuse=fuse, inplace=inplace, qconfig_mapping=qconfig_mapping, check=check,
                    reduce_range=reduce_range, fold_bn=fold_bn)


def prepare_ptq_fx_model(
    model: nn.Module,
    example_inputs: Any,
    *,
    engine: str = "x86",
    per_channel: bool = True,
    observer: str = "histogram",
    reduce_range: bool | None = None,
    relu6: str = "keep",
    fuse: bool = True,
    inplace: bool = False,
    qconfig_mapping: Any = None,
    check: bool = True,
) -> torch.fx.GraphModule:
    """Fuse, then insert observers for static post-training quantization (``prepare_fx``).

    Same arguments as :func:`prepare_qat_fx_model`; the defaults differ because there is no
    training to adapt: ``observer="histogram"`` (minimises the L2 quantization error of each
    activation, slower to calibrate) and ``relu6="keep"`` (a float-trained ReLU6 network is not
    re-trained, so its clip must stay). Run :func:`calibrate` next, then :func:`convert_fx_model`.
    """
    return _prepare(model, example_inputs, qat=False, engine=engine, per_channel=per_channel, observer=observer,
                    relu6=relu6, fuse=fuse, inplace=inplace, qconfig_mapping=qconfig_mapping, check=check,
                    reduce_range=reduce_range)


def _default_input_fn(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],)  # (x, y) pairs from a DataLoader
    if isinstance(batch, dict):
        return (batch.get("input", batch.get("x", next(iter(batch.values())))),)
    raise ConfigError(f"calibrate: cannot get model inputs from a batch of type {type(batch).__name__}; pass input_fn.")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    input_fn: Callable[[Any], tuple] | None = None,
) -> int:
    """Run calibration batches through a prepared model in eval mode (observers record ranges).

    Args:
        model: output of :func:`prepare_ptq_fx_model` (or a QAT model, to refresh ranges).
        batches: iterable of tensors, ``(x, y)`` pairs or dicts.
        max_batches: stop after this many.
        input_fn: ``batch -> tuple of model inputs`` for other batch layouts.

    Returns:
        The number of batches run.

    Raises:
        ConfigError: no batch was seen (observers would stay empty and convert would fail).
    """
    fn = input_fn or _default_input_fn
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with quantized_engine(model_engine(model)):
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                model(*fn(batch))
                seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError("calibrate: got no batches; observers have no statistics and convert would produce garbage.")
    return seen


def convert_fx_model(prepared: torch.fx.GraphModule, *, engine: str | None = None, inplace: bool = False) -> torch.fx.GraphModule:
    """Convert a prepared model to int8 (on a deep copy unless ``inplace=True``).

    Args:
        prepared: output of :func:`prepare_qat_fx_model` / :func:`prepare_ptq_fx_model`.
        engine: defaults to the engine stored on ``prepared``; weights are packed for it.
        inplace: convert ``prepared`` itself (it is then no longer trainable).

    Returns:
        The quantized ``GraphModule`` in eval mode, with the engine recorded on it.
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    engine = engine or model_engine(prepared) or torch.backends.quantized.engine
    check_engine(engine)
    target = prepared if inplace else copy.deepcopy(prepared)
    target.eval()
    with quantized_engine(engine):
        quantized = convert_fx(target, backend_config=backend_config_for(engine))
    remove_identities(quantized)
    set_model_engine(quantized, engine)
    return quantized.eval()


def is_fake_quant(model: nn.Module) -> bool:
    """Whether ``model`` carries fake-quant modules (a QAT-prepared training graph, not a deployable model)."""
    return any(hasattr(m, "enable_fake_quant") for m in model.modules())


def is_pt2e_int8(model: nn.Module) -> bool:
    """A pt2e-converted graph: Q/DQ ops from ``quantized_decomposed`` (FX int8 graphs use torch.quantize_per_*)."""
    graph = getattr(model, "graph", None)
    return graph is not None and any(n.op == "call_function" and "quantized_decomposed" in str(n.target) for n in graph.nodes)


def _switch(model: nn.Module, on: str, off: str, enabled: bool, what: str) -> int:
    """Call ``on``/``off`` on every module that has them (torch.ao and torchao fake-quants alike)."""
    check_bool("enabled", enabled)
    count = 0
    for mod in model.modules():
        method = getattr(mod, on if enabled else off, None)
        if callable(method) and hasattr(mod, on) and hasattr(mod, off) and mod is not model:
            method()
            count += 1
    if count == 0:
        warnings.warn(f"{what}: the model has no fake-quant / observer modules; nothing changed.", NoEffectWarning, stacklevel=3)
    return count


def set_fake_quant(model: nn.Module, enabled: bool) -> int:
    """Enable/disable fake quantization (numerics) in all fake-quant modules; returns the count."""
    return _switch(model, "enable_fake_quant", "disable_fake_quant", enabled, "set_fake_quant")


def set_observers(model: nn.Module, enabled: bool) -> int:
    """Enable/disable range observation (scale/zero-point updates); returns the count.

    Freezing observers late in QAT lets the weights adapt to fixed quantization grids
    (Krishnamoorthi 2018, "Quantizing deep convolutional networks for efficient inference", §3.2).
    """
    return _switch(model, "enable_observer", "disable_observer", enabled, "set_observers")


def freeze_bn_stats(model: nn.Module, freeze: bool = True) -> int:
    """Freeze (or unfreeze) BN running statistics in fused QAT ConvBn* modules; returns the count.

    After freezing, the folded conv uses the running statistics, as the int8 model will
    (Krishnamoorthi 2018 §3.2: freeze BN statistics after a few epochs of QAT).
    """
    check_bool("freeze", freeze)
    import torch.ao.nn.intrinsic.qat as nniqat

    kinds = tuple(getattr(nniqat, n) for n in ("ConvBn1d", "ConvBn2d", "ConvBn3d", "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d"))
    count = 0
    for mod in model.modules():
        if isinstance(mod, kinds):
            mod.freeze_bn_stats() if freeze else mod.update_bn_stats()
            count += 1
    if count == 0:
        warnings.warn("freeze_bn_stats: no fused ConvBn QAT module found; nothing changed.", NoEffectWarning, stacklevel=2)
    return count


def dynamic_quantize(
    model: nn.Module,
    dtypes: Iterable[type] = (nn.Linear, nn.LSTM, nn.GRU),
    *,
    engine: str | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Dynamic int8 quantization (weights int8, activations quantized on the fly) for text models.

    Best for Linear/LSTM-heavy models where weight bandwidth dominates (BERT students, PQRNN).

    Args:
        model: float model.
        dtypes: module classes to quantize.
        engine: engine to pack weights for; default the current one.
        inplace: modify ``model`` instead of a copy.

    Raises:
        ConfigError: ``dtypes`` holds something that is not an nn.Module class.
    """
    dtypes = set(dtypes)
    bad = [d for d in dtypes if not (isinstance(d, type) and issubclass(d, nn.Module))]
    if bad or not dtypes:
        raise ConfigError(f"dtypes must be a non-empty collection of nn.Module classes, got {bad or list(dtypes)}.")
    engine = engine or torch.backends.quantized.engine
    with quantized_engine(engine):
        out = torch.ao.quantization.quantize_dynamic(model, dtypes, dtype=torch.qint8, inplace=inplace)
    set_model_engine(out, engine)
    return out
