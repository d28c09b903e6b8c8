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

from typing import Any

import torch
from torch import nn

from lightning_eff.errors import ConfigError, did_you_mean
from lightning_eff.validation import check_bool

__all__ = [
    "COMPILE_MODES",
    "ChannelsLastInput",
    "check_compile_options",
    "compile_network",
    "is_compiled",
    "to_channels_last",
    "uncompile_network",
]

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _channels_last(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


class _InputHook:
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(_channels_last(a) for a in args), {k: _channels_last(v) for k, v in kwargs.items()}


def to_channels_last(net: nn.Module, inputs: bool = True) -> Any:
    """Channels-last weights (4-D parameters and buffers, in place), and 4-D inputs converted on entry.

    Args:
        net: the network (a non-image network is left as it is: nothing 4-D to convert).
        inputs: also convert the network's 4-D floating-point inputs (a forward pre-hook).

    Returns:
        The hook's handle (``.remove()`` stops converting inputs), or ``None`` when ``inputs=False``.
    """
    check_bool("inputs", inputs)
    net.to(memory_format=torch.channels_last)
    if not inputs:
        return None
    return net.register_forward_pre_hook(_InputHook(), with_kwargs=True)


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
