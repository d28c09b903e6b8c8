"""Make any conv net fusable for int8: split timm's norm+act modules, swap ReLU6, fold BN.

Why this exists. Integer kernels are fast because one call does ``conv -> bias -> ReLU ->
requantize`` on int8 data (Jacob et al., 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", §3). PyTorch only builds that kernel when the
quantization tracer sees the pattern ``Conv2d -> BatchNorm2d [-> ReLU]`` as adjacent *leaf
modules*. timm writes BN and activation as one module, ``BatchNormAct2d`` (a ``BatchNorm2d``
subclass whose ``forward`` calls ``F.batch_norm`` and then ``self.act``). The tracer walks into
it, sees a bare ``F.batch_norm`` call and leaves every BN as a separate (slow, large) op:
generic FX QAT on timm ``mobilenetv2_100`` ran at 11.3 ms / 4.6 MB on x86 against 4.0 ms for
torchvision's hand-fused model. :func:`fuse_for_quantization` rewrites each such module into
``nn.Sequential(bn=BatchNorm2d, [drop], act)`` with the same weights and buffers, so the
standard fusion patterns match.

ReLU6. ``conv+bn+relu`` is one quantized kernel; ``ReLU6`` (``hardtanh``) is not part of any
fused pattern and runs as an extra op on int8 data. torchvision's quantizable MobileNetV2
therefore replaces ReLU6 by ReLU before quantizing. We make that an explicit option:

* ``relu6="relu"``: every ``nn.ReLU6`` becomes ``nn.ReLU``. The float model changes wherever an
  activation exceeds 6 (it is no longer clipped). After QAT the activation observer learns the
  output range, and int8 saturation at ``scale * 255`` plays the role of the clip, so accuracy is
  unaffected in practice (torchvision ships its int8 MobileNetV2 this way); but a model trained
  in float with ReLU6 and then post-training quantized can drift: calibrate and check SQNR.
* ``relu6="keep"``: ReLU6 stays (exact float numerics, one extra op per activation in int8).

Hardswish / SiLU / GELU stay separate ops: there is no fused int8 kernel for them.

Equivalence check (RELIABILITY.md item 4). An incorrect rewrite would be accepted silently by
the quantization tooling and just change outputs. With ``check=True`` every rewritten group is
run on the input it really receives inside the model (captured with a forward hook) and the
whole model is compared end to end, in eval mode and with ReLU6 kept; a mismatch raises a
``ConfigError`` naming the group (e.g. ``blocks.1.0.bn2``). The ReLU6 swap, a deliberate
numeric change, is applied only after the check.

Example:
    >>> from lightning_eff.models import create_model
    >>> net = create_model("mobilenetv2_tiny").eval()
    >>> fused = fuse_for_quantization(net, example_inputs=(torch.randn(2, 1, 32, 32),))
    >>> type(fused.bn1).__name__
    'Sequential'
"""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_bool, check_choice, check_number

__all__ = [
    "fuse_for_quantization",
    "split_norm_act",
    "default_rewrites",
    "fold_conv_bn",
    "replace_relu6",
    "Passthrough",
    "replace_identities",
    "remove_identities",
    "ContiguousHardtanh",
    "fix_qnnpack_clamps",
    "after_contiguous",
    "QNNPACK_CLAMP_FUNCTIONS",
    "guard_zero_bn_weights",
]

Rewrite = Callable[[nn.Module], nn.Module]


def split_norm_act(module: nn.Module) -> nn.Module:
    """Rewrite a timm ``BatchNormAct2d`` into ``BatchNorm2d`` followed by its drop/act modules.

    ``nn.Identity`` parts are dropped: an Identity node between BN and ReLU in the traced graph
    would break the ``Conv-BN-ReLU`` pattern. Weights, running statistics and
    ``num_batches_tracked`` are the original tensors (shared), so outputs are identical in train and eval mode.

    Returns:
        A ``BatchNorm2d`` when drop and act are both Identity, else an ``nn.Sequential`` with
        children named ``bn``, ``drop`` and ``act``.
    """
    bn = nn.BatchNorm2d(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
    )
    # BatchNormAct2d inherits from BatchNorm2d, so its own keys are exactly BN's plus children. The
    # tensors themselves are moved over (not copied): the rewritten module holds the very parameters
    # and buffers of the original, so names can be traced back to the float network (naming.py).
    for key, value in module.state_dict(keep_vars=True).items():
        if "." not in key:
            setattr(bn, key, value)
    bn.train(module.training)
    parts: list[tuple[str, nn.Module]] = [("bn", bn)]
    for name in ("drop", "act"):
        part = getattr(module, name, None)
        if part is not None and not isinstance(part, nn.Identity):
            parts.append((name, part))
    return bn if len(parts) == 1 else nn.Sequential(OrderedDict(parts))


def default_rewrites() -> dict[type, Rewrite]:
    """The built-in rules: timm's ``BatchNormAct2d`` (and subclasses) -> BN + activation.

    ``SyncBatchNormAct`` is left out on purpose: a quantized model is converted on one process
    and sync-BN has no fusion pattern anyway; convert it with
    ``timm.layers.convert_sync_batchnorm``'s inverse before quantizing.
    """
    rules: dict[type, Rewrite] = {}
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:  # timm is optional for plain-torch models
        return rules
    rules[BatchNormAct2d] = split_norm_act
    return rules


class Passthrough(nn.Module):
    """``forward(x) = x``, like ``nn.Identity``, but invisible to FX tracing.

    ``nn.Identity`` is a leaf for the quantization tracer, so each one becomes a graph node, and
    prepare gives it a fake-quant that shares its input's qparams but still *runs* (timm puts
    Identity in the ``aa``/``se``/``drop_path`` slots of every block: ~45 extra fake-quant calls
    per MobileNetV2 step) and the int8 model keeps ~45 no-op module calls. This class lives
    outside ``torch.nn``, so the tracer inlines it and no node is created.
    """

    def forward(self, x):
        return x


def replace_identities(model: nn.Module) -> int:
    """Replace every ``nn.Identity`` by :class:`Passthrough` in place; returns the count."""
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Identity:
                setattr(parent, name, Passthrough())
                count += 1
    return count


def replace_relu6(model: nn.Module) -> int:
    """Replace every ``nn.ReLU6`` by ``nn.ReLU`` in place (torchvision's ``_replace_relu``).

    Returns:
        How many modules were replaced.
    """
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU6:
                setattr(parent, name, nn.ReLU(inplace=child.inplace))
                count += 1
    return count


#: Functional ops that QNNPACK's quantized clamp kernel computes wrongly on channels-last tensors,
#: which is what its convolutions return (torch 2.14.1, measured: ``F.relu6`` on a channels-last
#: quint8 tensor is off by up to 6.0, ``hardtanh(-1, 1)`` by 2.0; contiguous inputs and the x86
#: engine are exact). Modules are fixed by :class:`ContiguousHardtanh`; functional calls are
#: reported by a warning.
QNNPACK_CLAMP_FUNCTIONS = (torch.nn.functional.relu6, torch.nn.functional.hardtanh, torch.clamp, "clamp", "clamp_")


class ContiguousHardtanh(nn.Hardtanh):
    """``Hardtanh``/``ReLU6`` that makes its input contiguous first (work-around for QNNPACK).

    Float semantics are identical to ``nn.Hardtanh(min_val, max_val)``. On int8 tensors the
    ``contiguous()`` copy turns QNNPACK's channels-last conv output into the layout its clamp
    kernel handles correctly (a copy is much cheaper than dequantize -> float -> quantize).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.hardtanh(x.contiguous(), self.min_val, self.max_val)


def after_contiguous(node: torch.fx.Node) -> bool:
    """True when the clamp's input is a ``.contiguous()`` call (possibly behind an observer)."""
    arg = node.args[0] if node.args else None
    for _ in range(3):
        if not isinstance(arg, torch.fx.Node):
            return False
        if arg.op == "call_method" and arg.target == "contiguous":
            return True
        arg = arg.args[0] if arg.args else None
    return False


def fix_qnnpack_clamps(model: nn.Module) -> int:
    """Swap every ``nn.Hardtanh``/``nn.ReLU6`` for :class:`ContiguousHardtanh` in place; returns the count."""
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Hardtanh) and not isinstance(child, ContiguousHardtanh):
                setattr(parent, name, ContiguousHardtanh(child.min_val, child.max_val))
                count += 1
    return count


def remove_identities(graph_module: torch.fx.GraphModule) -> int:
    """Drop ``nn.Identity`` calls from a traced graph (timm's ``aa``/``se``/``drop_path`` slots).

    They do nothing, but each one is still a module call in the exported TorchScript (about 50
    in a MobileNetV2). Returns how many nodes were removed.
    """
    removed = 0
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), nn.Identity) and len(node.args) == 1 and not node.kwargs:
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
            removed += 1
    if removed:
        graph_module.graph.lint()
        graph_module.delete_all_unused_submodules()
        graph_module.recompile()
    return removed


#: What an exactly-zero BN weight becomes before QAT (see :func:`guard_zero_bn_weights`).
ZERO_GAMMA_REPLACEMENT = 1e-5


@torch.no_grad()
def guard_zero_bn_weights(model: nn.Module) -> int:
    """Replace BN weights that are exactly 0 by a tiny positive value before QAT.

    torch's fused QAT ``ConvBn*`` modules scale the conv weight by ``gamma / std`` and divide
    the conv output by the same factor, so ``gamma == 0`` gives ``0 / 0 = NaN`` on the first
    step. Zero-init of the last BN in each residual block (timm ResNets, torchvision's
    ``zero_init_residual``) does exactly that: QAT of a freshly built timm ``resnet18`` is NaN
    after one step. ``1e-5`` keeps the branch numerically silent (its weights quantize to 0)
    while gamma keeps receiving gradients.
    """
    count = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine:
            zero = mod.weight == 0
            if bool(zero.any()):
                mod.weight[zero] = ZERO_GAMMA_REPLACEMENT
                count += int(zero.sum())
    if count:
        warnings.warn(
            f"{count} BatchNorm weight(s) were exactly 0 (zero-init residual branches); set to {ZERO_GAMMA_REPLACEMENT} "
            "because fused Conv-BN QAT divides by them and would produce NaN.",
            UserWarning,
            stacklevel=5,
        )
    return count


def _rewrite(model: nn.Module, rules: Mapping[type, Rewrite], prefix: str = "") -> list[tuple[str, nn.Module, nn.Module]]:
    """Apply ``rules`` to every matching child (outermost match wins); return (name, old, new)."""
    done: list[tuple[str, nn.Module, nn.Module]] = []
    for name, child in list(model.named_children()):
        full = f"{prefix}{name}"
        rule = next((fn for cls, fn in rules.items() if isinstance(child, cls)), None)
        if rule is not None:
            new = rule(child)
            setattr(model, name, new)
            done.append((full, child, new))
        else:
            done.extend(_rewrite(child, rules, prefix=f"{full}."))
    return done


def _infer_example_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """A random image batch for models whose first layer is a conv (the common case)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
    if first is None:
        raise ConfigError(
            "example_inputs=None: cannot guess an input for the equivalence check because the model has no "
            "convolution; pass example_inputs=(tensor, ...) or check=False."
        )
    param = next(model.parameters())
    spatial = (64,) if isinstance(first, nn.Conv1d) else (8, 16, 16) if isinstance(first, nn.Conv3d) else (32, 32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, first.in_channels, *spatial, generator=gen).to(param.device, param.dtype)
    return (x,)


def _as_tuple(example_inputs: Any) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(v) for v in x)
    return x


def _max_err(a: Any, b: Any) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (tuple, list)):
        return max((_max_err(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, dict):
        return max((_max_err(a[k], b[k]) for k in a), default=0.0)
    return 0.0


def _close(a: Any, b: Any, atol: float, rtol: float) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_close(x, y, atol, rtol) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], atol, rtol) for k in a)
    return a == b


@torch.no_grad()
def _check_equivalence(original: nn.Module, rewritten: nn.Module, done, inputs: tuple, atol: float, rtol: float) -> None:
    """Raise ``ConfigError`` naming the first rewritten group whose eval outputs changed."""
    was_training = (original.training, rewritten.training)
    original.eval()
    rewritten.eval()
    captured: dict[str, tuple] = {}
    # Clone what the hook sees: later in-place ops (ReLU(inplace=True), ``x += shortcut``) would
    # otherwise mutate the captured tensors before we compare.
    # ``done`` holds the modules cut out of the *copy*; hook their twins in the reference model.
    def capture(name: str):
        def hook(module, args, out) -> None:  # must return None, else it replaces the output
            captured.setdefault(name, (_clone(args), _clone(out)))

        return hook

    hooks = [original.get_submodule(name).register_forward_hook(capture(name)) for name, _, _ in done]
    try:
        reference = original(*inputs)
    finally:
        for h in hooks:
            h.remove()
    try:
        for name, old, new in done:
            if name not in captured:  # group not on the forward path for these inputs
                continue
            args, out = captured[name]
            got = new(*_clone(args))
            if not _close(out, got, atol, rtol):
                raise ConfigError(
                    f"fusion rewrite changed the outputs of module group {name!r} "
                    f"({type(old).__name__} -> {type(new).__name__}); "
                    f"max abs error {_max_err(out, got):.3g} > atol={atol}, rtol={rtol}. "
                    "Fix or remove the rewrite rule for this module type."
                )
        result = rewritten(*inputs)
        if not _close(reference, result, atol, rtol):
            raise ConfigError(
                "fusion rewrite changed the outputs of the whole model although every rewritten group "
                f"matched on its own (max abs error {_max_err(reference, result):.3g}); a rewrite rule "
                "probably broke the module wiring (shared modules or in-place ops)."
            )
    finally:
        original.train(was_training[0])
        rewritten.train(was_training[1])


def fuse_for_quantization(
    model: nn.Module,
    *,
    relu6: str = "relu",
    example_inputs: Any = None,
    check: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    inplace: bool = False,
    rewrites: Mapping[type, Rewrite] | None = None,
    reference: nn.Module | None = None,
) -> nn.Module:
    """Rewrite a model so that PyTorch's Conv-BN(-ReLU) fusion patterns match it.

    Also replaces ``nn.Identity`` placeholders by :class:`Passthrough` (traced away, see there).

    Works on a deep copy unless ``inplace=True`` (the original stays a valid float model, e.g.
    for the equivalence check and as the reference in export verification). Training mode and
    device are preserved. Modules that are already plain ``Conv2d/BatchNorm2d/ReLU`` (torchvision
    ResNets, timm ResNets) pass through untouched, so calling this on any conv net is safe.

    Args:
        model: any ``nn.Module`` (timm EfficientNet/MobileNet families are the main target).
        relu6: ``"relu"`` replaces ReLU6 with ReLU so conv+bn+relu fuse into one int8 kernel
            (changes float numerics where activations exceed 6, see module docstring);
            ``"keep"`` keeps exact float numerics.
        example_inputs: inputs for the equivalence check (tensor or tuple). ``None`` builds a
            random ``(2, C, 32, 32)`` batch from the first convolution.
        check: run the equivalence check (eval mode, before the ReLU6 swap).
        atol: absolute tolerance of the check.
        rtol: relative tolerance of the check.
        inplace: modify ``model`` itself instead of a copy.
        rewrites: ``{module class: fn(module) -> module}`` rules; default :func:`default_rewrites`.
            Supply your own for custom norm+act blocks.
        reference: an unmodified equal model for the check when ``inplace=True`` (default: a deep copy),
            e.g. the original a caller already copied ``model`` from.

    Returns:
        The rewritten model (``model`` itself when ``inplace=True``).

    Raises:
        ConfigError: bad option, or a rewritten group whose outputs changed (named in the message).
    """
    check_choice("relu6", relu6, ["relu", "keep"])
    check_bool("check", check)
    check_bool("inplace", inplace)
    check_number("atol", atol, low=0.0)
    check_number("rtol", rtol, low=0.0)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}.")
    rules = default_rewrites() if rewrites is None else dict(rewrites)
    for cls, fn in rules.items():
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or not callable(fn):
            raise ConfigError(f"rewrites must map nn.Module classes to callables; got {cls!r}: {fn!r}.")
    original = model
    target = model if inplace else copy.deepcopy(model)
    if reference is None:
        reference = copy.deepcopy(model) if (inplace and check) else original
    done = _rewrite(target, rules)
    replace_identities(target)
    if check and done:
        inputs = _infer_example_inputs(reference) if example_inputs is None else _as_tuple(example_inputs)
        _check_equivalence(reference, target, done, inputs, atol, rtol)
    if relu6 == "relu":
        replace_relu6(target)
    return target


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Fold an eval-mode BatchNorm into the preceding convolution (inference only).

    With ``s = gamma / sqrt(running_var + eps)`` per output channel,
    ``W' = W * s`` and ``b' = (b - running_mean) * s + beta``, so ``conv'(x) == bn(conv(x))`` in
    eval mode. Computed in float64 to keep the folded model within float rounding of the
    original. Returns a new convolution (always with a bias); the inputs are not modified.

    Args:
        conv: ``nn.Conv1d/2d/3d`` (grouped and depthwise included).
        bn: ``nn.BatchNorm1d/2d/3d`` with running statistics.

    Raises:
        ConfigError: wrong module types, channel mismatch, or BN without running statistics.
    """
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise ConfigError(f"fold_conv_bn: conv must be nn.Conv1d/2d/3d, got {type(conv).__name__}.")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ConfigError(f"fold_conv_bn: bn must be a BatchNorm module, got {type(bn).__name__}.")
    if bn.num_features != conv.out_channels:
        raise ConfigError(
            f"fold_conv_bn: bn.num_features={bn.num_features} does not match conv.out_channels={conv.out_channels}."
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ConfigError("fold_conv_bn: bn has track_running_stats=False; there are no statistics to fold.")
    dtype = conv.weight.dtype
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    fused = copy.deepcopy(conv)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    fused.weight = nn.Parameter((conv.weight.double() * scale.reshape(shape)).to(dtype))
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused.bias = nn.Parameter((bias * scale + shift).to(dtype))
    return fused
