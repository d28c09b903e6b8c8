"""Gradient-communication hooks for ``DistributedDataParallel``, chosen by name, in any training loop.

After each backward pass DDP averages every gradient bucket across the processes with a float32
all-reduce. A *communication hook* replaces that step (PyTorch's ``DDP.register_comm_hook``); the
ones here trade a little gradient precision for fewer bytes on the wire, which is what limits DDP
between machines (the survey's §3.5 infrastructure: distributed training is bandwidth-bound):

======================  ==========================================================================
``none``                DDP's own float32 all-reduce (the reference; nothing is registered).
``fp16``                each bucket cast to float16, divided by the world size, all-reduced, cast
                        back: half the bytes; gradients beyond ±65504 (after the division) overflow
                        to ``inf`` (``default_hooks.fp16_compress_hook``).
``bf16``                the same in bfloat16: float32's range, 8 significant bits; no overflow
                        (``default_hooks.bf16_compress_hook``).
``powersgd``            PowerSGD (Vogels et al., NeurIPS 2019): each matrix-shaped gradient sent as a
                        rank-``r`` product ``P Q^T`` found by one power iteration, with error feedback
                        (what the approximation lost is added to the next step's gradient) and warm
                        start; vectors (biases, norms) and tensors that would not shrink by
                        ``min_compression_rate`` are all-reduced as they are. The first
                        ``start_powerSGD_iter`` iterations are plain all-reduces (``powerSGD_hook``).
======================  ==========================================================================

Verified on torch 2.14.1 with the ``gloo`` backend on CPU (``tests/test_ddp_hooks.py``, 2 processes):
all four run and DDP reports them in ``_get_ddp_logging_data()["comm_hook"]``; float16/bfloat16
all-reduce are supported by gloo on CPU, so no name is refused there. ``bf16`` on NCCL needs
NCCL >= 2.10 (bfloat16 all-reduce), which is checked.

Lightning 2.6 registers its own ``DDPStrategy(ddp_comm_hook=...)`` only on CUDA and silently drops it
elsewhere; :class:`lightning_eff.strategies.DDPStrategy` calls :func:`register_comm_hook` on every device.

Example (one process, so the "world" is one rank and the average is the gradient itself):
    >>> import os, torch, torch.distributed as dist
    >>> from torch.nn.parallel import DistributedDataParallel as DDP
    >>> dist.init_process_group("gloo", init_method="file://" + os.path.abspath("pg_store"), rank=0, world_size=1)
    >>> model = DDP(torch.nn.Linear(4, 2))
    >>> state = register_comm_hook(model, "powersgd", matrix_approximation_rank=1, start_powerSGD_iter=2)
    >>> comm_hook_name(model)
    'powerSGD_hook'
    >>> model(torch.randn(3, 4)).sum().backward()
    >>> state.iter
    1
    >>> dist.destroy_process_group()
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lightning_eff.errors import ConfigError, did_you_mean
from lightning_eff.validation import check_bool, check_choice, check_int, check_number

__all__ = ["COMM_HOOKS", "POWERSGD_OPTIONS", "CommHook", "check_comm_hook", "comm_hook_name", "register_comm_hook"]

#: The hook names :func:`register_comm_hook` accepts.
COMM_HOOKS = ("none", "fp16", "bf16", "powersgd")

#: ``powersgd`` options: ``torch...powerSGD_hook.PowerSGDState``'s arguments (its defaults apply to the ones left out).
POWERSGD_OPTIONS: dict[str, Callable[[str, Any], Any]] = {
    "matrix_approximation_rank": lambda k, v: check_int(k, v, low=1),
    "start_powerSGD_iter": lambda k, v: check_int(k, v, low=1),
    "min_compression_rate": lambda k, v: check_number(k, v, low=0.0),
    "use_error_feedback": check_bool,
    "warm_start": check_bool,
    "orthogonalization_epsilon": lambda k, v: check_number(k, v, low=0.0),
    "random_seed": lambda k, v: check_int(k, v, low=0),
    "compression_stats_logging_frequency": lambda k, v: check_int(k, v, low=1),
    "batch_tensors_with_same_shape": check_bool,
}
_POWERSGD_DEFAULTS = {"start_powerSGD_iter": 1_000, "use_error_feedback": True, "warm_start": True}
_NCCL_BF16 = (2, 10)  # bfloat16 all-reduce arrived in NCCL 2.10


@dataclass(frozen=True)
class CommHook:
    """A validated hook choice: ``name`` (one of :data:`COMM_HOOKS`, any case) and its ``options``.

    Args:
        name: ``none``, ``fp16``, ``bf16`` or ``powersgd``.
        options: keyword options of the hook; only ``powersgd`` takes any (:data:`POWERSGD_OPTIONS`).

    Raises:
        ConfigError: an unknown name or option, a value of the wrong type or range, or
            ``start_powerSGD_iter`` <= 1 with error feedback or warm start (their state needs the
            gradient buckets DDP settles on after its first iteration, so PowerSGD refuses it).
    """

    name: str = "none"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = self.name.lower() if isinstance(self.name, str) else self.name
        check_choice("comm_hook", name, COMM_HOOKS)
        if self.options is None:
            options: dict[str, Any] = {}
        elif isinstance(self.options, Mapping):
            options = dict(self.options)
        else:
            raise ConfigError(f"comm_hook_options={self.options!r} must be a mapping of option names to values, "
                              f"e.g. {{matrix_approximation_rank: 2}} ({type(self.options).__name__} given).")
        if name != "powersgd" and options:
            raise ConfigError(f"comm_hook={name!r} takes no options (comm_hook_options={options!r}); only 'powersgd' does: "
                              f"{sorted(POWERSGD_OPTIONS)}.")
        for key, value in options.items():
            if key not in POWERSGD_OPTIONS:
                raise ConfigError(f"comm_hook_options.{key}={value!r} is not a powersgd option; valid options: "
                                  f"{sorted(POWERSGD_OPTIONS)}.{did_you_mean(key, POWERSGD_OPTIONS)}")
            options[key] = POWERSGD_OPTIONS[key](f"comm_hook_options.{key}", value)
        if name == "powersgd":
            merged = {**_POWERSGD_DEFAULTS, **options}
            if (merged["use_error_feedback"] or merged["warm_start"]) and merged["start_powerSGD_iter"] <= 1:
                raise ConfigError(
                    f"comm_hook_options.start_powerSGD_iter={merged['start_powerSGD_iter']!r} must be at least 2 while "
                    "use_error_feedback or warm_start is on: PowerSGD keeps per-bucket state, and DDP rebuilds its "
                    "buckets after the first iteration. Set start_powerSGD_iter >= 2, or both of them to false.")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", options)


def check_comm_hook(name: str, options: Mapping[str, Any] | None = None) -> CommHook:
    """Validate a hook name and its options without a model or a process group (configuration time).

    Raises:
        ConfigError: see :class:`CommHook`.
    """
    return CommHook(name, options or {})


def register_comm_hook(
    ddp_model: DistributedDataParallel,
    name: str = "none",
    *,
    process_group: dist.ProcessGroup | None = None,
    **options: Any,
) -> Any:
    """Register the communication hook ``name`` on a DDP-wrapped model; call once, before the first backward.

    Args:
        ddp_model: the ``DistributedDataParallel`` module (its process group must be initialised).
        name: one of :data:`COMM_HOOKS` (``none`` registers nothing and keeps DDP's all-reduce).
        process_group: the group to reduce over (``None``: the default group, as DDP uses).
        **options: the hook's options (``powersgd`` only: :data:`POWERSGD_OPTIONS`).

    Returns:
        The hook's state: the ``PowerSGDState`` for ``powersgd`` (its ``iter`` counts the iterations it
        has seen), the process group for ``fp16``/``bf16``, ``None`` for ``none``.

    Raises:
        ConfigError: an invalid name or option (see :class:`CommHook`), or ``bf16`` on an NCCL older than 2.10.
        TypeError: ``ddp_model`` is not a ``DistributedDataParallel`` (wrap the model first: the hook lives
            on DDP's reducer).
    """
    hook = CommHook(name, options)
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"register_comm_hook needs a DistributedDataParallel model, got {type(ddp_model).__name__}; "
                        "wrap it first (DistributedDataParallel(model) after init_process_group).")
    if hook.name == "none":
        return None
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook.name == "bf16":
        _check_bf16_backend(process_group)
    if hook.name == "powersgd":
        state: Any = powerSGD_hook.PowerSGDState(process_group=process_group, **hook.options)
        ddp_model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return state
    fn = default_hooks.fp16_compress_hook if hook.name == "fp16" else default_hooks.bf16_compress_hook
    ddp_model.register_comm_hook(process_group, fn)
    return process_group


def comm_hook_name(ddp_model: DistributedDataParallel) -> str | None:
    """The name of the hook DDP runs (``"fp16_compress_hook"``, ``"powerSGD_hook"``, ...), ``None`` for its own all-reduce.

    Read from DDP's logging data (what ``torch.distributed`` reports in its usage logs), i.e. from
    the reducer itself, not from what was asked for.
    """
    data = ddp_model._get_ddp_logging_data()
    value = data.get("comm_hook")
    return None if value in (None, "", "builtin_allreduce") else str(value)


def _check_bf16_backend(process_group: dist.ProcessGroup | None) -> None:
    backend = dist.get_backend(process_group)
    if backend == "nccl" and torch.cuda.is_available():
        version = torch.cuda.nccl.version()
        version = version if isinstance(version, tuple) else (version // 1000, version % 1000 // 100)
        if tuple(version[:2]) < _NCCL_BF16:
            raise ConfigError(f"comm_hook='bf16' needs bfloat16 all-reduce (NCCL >= 2.10); this build has NCCL "
                              f"{'.'.join(map(str, version))}. Use comm_hook='fp16' or 'powersgd'.")
