"""Compiler and memory layout: ``torch.compile`` and channels-last (NHWC), as plain functions.

- **torch.compile** is the modern form of the survey's JIT fusion of point-wise operations (§3.5):
  TorchDynamo captures the Python forward, Inductor fuses element-wise ops into generated C++/OpenMP
  (CPU) or Triton (GPU) kernels. :func:`compile_network` compiles a module *in place*
  (``nn.Module.compile``), so parameter names and state-dict keys do not change (``torch.compile(m)``
  would prefix them with ``_orig_mod.``) and every other technique keeps finding its modules.
  On CPU the first step compiles for minutes (a warm cache: seconds), so tests use ``backend="eager"``.
- **Channels-last** stores an image batch as NHWC: oneDNN (CPU) and cuDNN (GPU) convolution kernels
  are written for it, and depthwise convolutions (MobileNet) gain most. :func:`to_channels_last`
  converts the 4-D weights in place (same parameter objects: the optimizer keeps working) and adds a
  forward pre-hook that converts 4-D inputs, so the layout holds from the first layer on without the
  user's data pipeline changing. :class:`ChannelsLastInput` does the same inside an exported graph.
- **BatchNorm's channels-last backward** on CPU (ATen's float32 kernel) accumulates per-thread sums in
  adjacent rows of one buffer: with fewer than 32 channels and a count that is not a multiple of 16, two
  threads write the same cache line for every pixel and it runs 3-13x slower than the NCHW kernel on the
  same tensor (2 threads, AVX2 and AVX-512 kernels alike: 8 channels at 32x32, batch 128: 11.1 vs 1.6 ms;
  24 channels 13.9 vs 4.3 ms; 16, 32, 48, 64, and one thread, are not slow).
  :func:`nchw_batchnorm_backward` (applied by :func:`to_channels_last` unless
  ``batchnorm_backward="native"``) runs the backward of exactly those BatchNorm calls on NCHW copies
  (ATen's own NCHW kernel; the forward and its running statistics are untouched), which for
  MobileNetV2 w0.5 at 32 px (one 8-channel BatchNorm) is a training step about 0.95x.
- **In-place activations that copy.** Under autograd, the in-place form of an activation whose backward
  needs its input (``ReLU6``/``Hardtanh``, ``Hardswish``, ``SiLU``, ``Hardsigmoid``, ``Mish``, ``Threshold``)
  first clones that input for the backward and then overwrites it: the same memory as out of place, plus a
  copy. :func:`out_of_place_activations` (applied by :func:`to_channels_last` unless
  ``inplace_activations="keep"``) switches their ``inplace`` flag off until its handle is removed: bitwise the
  same forward and gradients, MobileNetV2 w0.5 at 32 px (35 ReLU6) a training step about 0.95x.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    >>> handle = to_channels_last(net)
    >>> net(torch.randn(1, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    True
    >>> handle.remove()
"""
from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_eff.errors import ConfigError, did_you_mean
from lightning_eff.validation import check_bool

__all__ = [
    "BATCHNORM_BACKWARD",
    "CLONING_INPLACE_ACTIVATIONS",
    "COMPILE_MODES",
    "INPLACE_ACTIVATIONS",
    "ChannelsLastInput",
    "LayoutHandle",
    "check_batchnorm_backward",
    "check_compile_options",
    "check_inplace_activations",
    "compile_network",
    "is_compiled",
    "nchw_batchnorm_backward",
    "out_of_place_activations",
    "slow_channels_last_batchnorm",
    "to_channels_last",
    "uncompile_network",
]

BATCHNORM_BACKWARD = ("auto", "native")
INPLACE_ACTIVATIONS = ("auto", "keep")
#: Activations whose in-place call makes autograd clone the input (their backward reads it; measured with the
#: profiler: ReLU, LeakyReLU and ELU do not, their backward reads the output).
CLONING_INPLACE_ACTIVATIONS = (nn.Hardtanh, nn.Hardswish, nn.SiLU, nn.Hardsigmoid, nn.Mish, nn.Threshold)

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _channels_last(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


class _InputHook:
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(_channels_last(a) for a in args), {k: _channels_last(v) for k, v in kwargs.items()}


class LayoutHandle:
    """The hooks :func:`to_channels_last` / :func:`nchw_batchnorm_backward` installed; ``remove()`` takes them all off.

    ``rerouted`` names the BatchNorms whose backward goes through NCHW, ``switched`` the activations run out of place.
    """

    def __init__(self, handles: list[Any], rerouted: list[str] | None = None,
                 switched: list[nn.Module] | None = None) -> None:
        self.handles = list(handles)
        self.rerouted = list(rerouted or [])
        self.switched = list(switched or [])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __len__(self) -> int:
        return len(self.handles)


def slow_channels_last_batchnorm(num_features: int, threads: int | None = None) -> bool:
    """Whether ATen's float32 channels-last BatchNorm backward is on its slow path for ``num_features`` channels.

    The kernel parallelises over pixels and accumulates per-thread sums in one ``[threads, C]`` buffer:
    with ``C`` floats not a multiple of a 64-byte cache line, neighbouring threads write the same line
    for every pixel (false sharing). Below 32 channels and not a multiple of 16 (1-15, 17-31), with
    more than one thread (``threads``; default ``torch.get_num_threads()``), that measured 3-13x the
    NCHW kernel's time on AVX2 and AVX-512 kernels alike (2 threads: 8 channels 11.1 vs 1.6 ms, slower
    than one thread's 3.9 ms); at 16 channels, from 32 on, or with one thread it is not slow.
    """
    threads = torch.get_num_threads() if threads is None else threads
    return threads > 1 and num_features < 32 and num_features % 16 != 0


class _NCHWBackwardBatchNorm(torch.autograd.Function):
    """Training-mode batch norm: ATen's forward as it is (channels-last in, channels-last out, running
    statistics updated in place), the backward by ATen's NCHW kernel on contiguous copies (itself
    differentiable, so double backward works)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):  # noqa: D102
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_in, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), x.contiguous(), weight, None, None, mean, invstd, True, ctx.eps, mask)
        if grad_in is not None:
            grad_in = grad_in.contiguous(memory_format=torch.channels_last)
        return grad_in, grad_w, grad_b, None, None, None, None


def _rerouted_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,  # noqa: A002
                         momentum=0.1, eps=1e-5):
    """``F.batch_norm``'s arguments -> the rerouted result, or ``None`` where ATen's own path is the right one."""
    x = input
    if not (training and type(x) is torch.Tensor and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 4
            and slow_channels_last_batchnorm(x.size(1)) and x.size(0) * x.size(2) * x.size(3) > 1
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
        return None
    return _NCHWBackwardBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)


class _BatchNormMode(TorchFunctionMode):
    """Active only inside the forward of a hooked BatchNorm module: reroutes its ``F.batch_norm`` call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is F.batch_norm:
            out = _rerouted_batch_norm(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


class _BatchNormHook:
    """Forward pre-hook + always-called forward hook of one BatchNorm module (thread-safe: a stack per thread)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def __getstate__(self) -> dict:  # picklable / deep-copyable: the per-thread state is not carried over
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()

    def pre(self, module: nn.Module, args: tuple) -> None:
        mode = None
        if (module.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not _fx_tracing()):
            mode = _BatchNormMode()
            mode.__enter__()
        self._stack().append(mode)

    def post(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = self._stack()
        mode = stack.pop() if stack else None
        if mode is not None:
            mode.__exit__(None, None, None)


def _fx_tracing() -> bool:
    from torch.fx import _symbolic_trace

    check = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None)  # torch >= 2.8; is_fx_tracing warns on every call
    return bool(check()) if check is not None else bool(_symbolic_trace._get_is_fx_tracing())


def nchw_batchnorm_backward(net: nn.Module) -> LayoutHandle | None:
    """Run the training backward of ``net``'s slow channels-last BatchNorms through ATen's NCHW kernel.

    Hooks every ``BatchNorm2d`` (subclasses included: timm's ``BatchNormAct2d``, the BN inside torch.ao's
    QAT Conv-BN modules) whose channel count is on the slow path (:func:`slow_channels_last_batchnorm`,
    with 2 threads). While such a module runs in training mode with autograd on, with more than one
    thread, its ``F.batch_norm`` call on a float32 CPU channels-last tensor computes the forward as ATen
    does (same kernel, same running statistics) and the backward on NCHW copies: gradients agree with the channels-last kernel's to float rounding
    (the reduction order differs). Evaluation, ``no_grad``, other layouts and dtypes, and code being
    compiled, traced or scripted see the module unchanged; state-dict keys and parameters are untouched.

    Returns:
        A :class:`LayoutHandle` (``.remove()`` takes the hooks off), or ``None`` when no BatchNorm matched.
    """
    handles, rerouted = [], []
    for name, module in net.named_modules():
        if isinstance(module, nn.BatchNorm2d) and slow_channels_last_batchnorm(module.num_features, threads=2):
            hook = _BatchNormHook()
            handles.append(module.register_forward_pre_hook(hook.pre))
            handles.append(module.register_forward_hook(hook.post, always_call=True))
            rerouted.append(name)
    return LayoutHandle(handles, rerouted=rerouted) if handles else None


class _InplaceFlags:
    """Puts ``inplace=True`` back on the modules :func:`out_of_place_activations` switched (its ``remove()``)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            module.inplace = True
        self.modules = []


def out_of_place_activations(net: nn.Module) -> LayoutHandle | None:
    """Switch off ``inplace`` on ``net``'s activations whose in-place form clones its input under autograd.

    Those in :data:`CLONING_INPLACE_ACTIVATIONS` with ``inplace=True`` (timm's ``BatchNormAct2d`` holds
    ``ReLU6(inplace=True)``): out of place, a training step keeps the same tensors alive and skips one copy per
    activation; forward values and gradients are bitwise the same. Inference without autograd loses the in-place
    saving, so the handle's ``remove()`` switches them back (``ChannelsLast`` does when training ends).

    Returns:
        A :class:`LayoutHandle`, or ``None`` when no activation was switched.
    """
    switched = [m for m in net.modules() if isinstance(m, CLONING_INPLACE_ACTIVATIONS) and getattr(m, "inplace", False) is True]
    for module in switched:
        module.inplace = False
    return LayoutHandle([_InplaceFlags(switched)], switched=switched) if switched else None


def to_channels_last(net: nn.Module, inputs: bool = True, batchnorm_backward: str = "auto",
                     inplace_activations: str = "auto") -> LayoutHandle | None:
    """Channels-last weights (4-D parameters and buffers, in place), and 4-D inputs converted on entry.

    Args:
        net: the network (a non-image network is left as it is: nothing 4-D to convert).
        inputs: also convert the network's 4-D floating-point inputs (a forward pre-hook).
        batchnorm_backward: ``"auto"`` runs the training backward of the BatchNorms whose channel count
            is on ATen's slow channels-last path through the NCHW kernel (:func:`nchw_batchnorm_backward`);
            ``"native"`` leaves every BatchNorm to ATen's channels-last kernel.
        inplace_activations: ``"auto"`` runs the activations that clone their input when in place out of place
            (:func:`out_of_place_activations`); ``"keep"`` leaves their ``inplace`` flags alone.

    Returns:
        A :class:`LayoutHandle` (``.remove()`` stops converting inputs, takes the BatchNorm hooks off and
        puts the ``inplace`` flags back), or ``None`` when nothing was installed.

    Raises:
        ConfigError: a ``batchnorm_backward`` / ``inplace_activations`` that is not one of
            :data:`BATCHNORM_BACKWARD` / :data:`INPLACE_ACTIVATIONS`.
    """
    check_bool("inputs", inputs)
    check_batchnorm_backward(batchnorm_backward)
    check_inplace_activations(inplace_activations)
    net.to(memory_format=torch.channels_last)
    parts = [LayoutHandle([net.register_forward_pre_hook(_InputHook(), with_kwargs=True)]) if inputs else None,
             nchw_batchnorm_backward(net) if batchnorm_backward == "auto" else None,
             out_of_place_activations(net) if inplace_activations == "auto" else None]
    parts = [part for part in parts if part is not None]
    if not parts:
        return None
    return LayoutHandle([h for part in parts for h in part.handles], rerouted=[n for part in parts for n in part.rerouted],
                        switched=[m for part in parts for m in part.switched])


def check_inplace_activations(value: Any) -> str:
    """``value`` if it is one of :data:`INPLACE_ACTIVATIONS`, else a ``ConfigError`` naming the choices."""
    if value not in INPLACE_ACTIVATIONS:
        raise ConfigError(f"inplace_activations={value!r} is not a choice; choose from {list(INPLACE_ACTIVATIONS)}."
                          f"{did_you_mean(str(value), INPLACE_ACTIVATIONS)}")
    return value


def check_batchnorm_backward(value: Any) -> str:
    """``value`` if it is one of :data:`BATCHNORM_BACKWARD`, else a ``ConfigError`` naming the choices."""
    if value not in BATCHNORM_BACKWARD:
        raise ConfigError(f"batchnorm_backward={value!r} is not a choice; choose from {list(BATCHNORM_BACKWARD)}."
                          f"{did_you_mean(str(value), BATCHNORM_BACKWARD)}")
    return value


class ChannelsLastInput(nn.Module):
    """``module`` behind an input conversion to channels-last: what an exported graph needs to run NHWC.

    The caller keeps feeding NCHW tensors; the first op of the graph reorders them and every
    convolution after it runs on the NHWC kernels (measured here on a frozen TorchScript MobileNetV2:
    see the README's results).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, *args: Any) -> Any:  # noqa: D102
        return self.module(*[_channels_last(a) for a in args])


def check_compile_options(backend: str = "inductor", mode: str | None = None, fullgraph: bool = False,
                          dynamic: bool | None = None) -> None:
    """Refuse a compile backend or mode torch does not have, naming the choices.

    Raises:
        ConfigError: unknown ``backend`` / ``mode``, or a non-boolean flag.
    """
    backends = sorted(torch._dynamo.list_backends(exclude_tags=()))
    if backend not in backends:
        raise ConfigError(f"backend={backend!r} is not a torch.compile backend; choices: {backends}.{did_you_mean(backend, backends)}")
    if mode not in COMPILE_MODES:
        raise ConfigError(f"mode={mode!r} is not a torch.compile mode; choices: {list(COMPILE_MODES)}.")
    check_bool("fullgraph", fullgraph)
    if dynamic is not None:
        check_bool("dynamic", dynamic)


def compile_network(net: nn.Module, backend: str = "inductor", mode: str | None = None, fullgraph: bool = False,
                    dynamic: bool | None = None) -> nn.Module:
    """Compile ``net`` in place (``nn.Module.compile``): same object, same names, compiled ``__call__``.

    Raises:
        ConfigError: see :func:`check_compile_options`.
    """
    check_compile_options(backend, mode, fullgraph, dynamic)
    options: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
    if mode not in (None, "default"):
        options["mode"] = mode
    net.compile(**options)
    return net


def is_compiled(net: nn.Module) -> bool:
    """Whether ``net`` was compiled in place (:func:`compile_network`) or is a ``torch.compile`` wrapper."""
    return getattr(net, "_compiled_call_impl", None) is not None or type(net).__name__ == "OptimizedModule"


def uncompile_network(net: nn.Module) -> nn.Module:
    """Undo :func:`compile_network` (the eager ``__call__`` again)."""
    if getattr(net, "_compiled_call_impl", None) is not None:
        net._compiled_call_impl = None
    return net
