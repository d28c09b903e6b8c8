"""Lightning strategies: DDP whose gradient-communication hooks take effect on every device.

Lightning 2.6's ``DDPStrategy(ddp_comm_hook=...)`` registers the hook only when the device is CUDA
(``_register_ddp_hooks``) and silently ignores it elsewhere, so a CPU/gloo run trains with plain
all-reduce while the config says ``fp16``. :class:`DDPStrategy` takes the hook **by name**
(flat primitives, so Hydra builds it from ``conf/trainer/distributed/*.yaml``) and registers it
through :func:`lightning_eff.training.ddp.register_comm_hook` on whatever device DDP wraps.

:func:`multirun_strategy` says what a DDP strategy must become inside a Hydra multirun job (ranks
started in-process instead of by re-running the command line, unless something outside already
started them).

Not registered in Lightning's strategy registry: a name there would only exist after something
imported this module, so ``trainer.strategy=<name>`` would work or fail depending on import order;
a ``_target_`` node (``trainer.strategy._target_=lightning_eff.strategies.DDPStrategy``) always works.

Example:
    >>> strategy = DDPStrategy(comm_hook="powersgd", comm_hook_options={"matrix_approximation_rank": 2,
    ...                        "start_powerSGD_iter": 10}, process_group_backend="gloo")
    >>> strategy.comm_hook
    CommHook(name='powersgd', options={'matrix_approximation_rank': 2, 'start_powerSGD_iter': 10})
    >>> trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy)  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from lightning.fabric.plugins.environments import (
    LSFEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.parallel import DistributedDataParallel

from lightning_eff.errors import ConfigError, did_you_mean
from lightning_eff.training.ddp import CommHook, comm_hook_name, register_comm_hook
from lightning_eff.validation import check_choice, check_number

__all__ = ["DDPStrategy", "multirun_strategy", "processes_created_externally"]

START_METHODS = ("popen", "spawn", "fork", "forkserver")
# Lightning's own DDPStrategy arguments that are objects, not config values; passed through unchanged.
_LIGHTNING_ARGS = {"accelerator", "parallel_devices", "cluster_environment", "checkpoint_io", "precision_plugin",
                   "ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period"}
# DistributedDataParallel arguments Lightning sets itself (the module and its device).
_DDP_SET_BY_LIGHTNING = {"self", "module", "device_ids", "output_device"}


def _ddp_arguments() -> list[str]:
    return [n for n in inspect.signature(DistributedDataParallel.__init__).parameters if n not in _DDP_SET_BY_LIGHTNING]


class DDPStrategy(_LightningDDPStrategy):
    """Lightning's ``DDPStrategy`` plus a gradient-communication hook that is registered on every device.

    Args:
        comm_hook: ``none`` (DDP's float32 all-reduce), ``fp16``, ``bf16`` or ``powersgd``
            (:mod:`lightning_eff.training.ddp` says what each does and costs).
        comm_hook_options: the hook's options, ``powersgd`` only, e.g. ``{matrix_approximation_rank: 2,
            start_powerSGD_iter: 1000}`` (``PowerSGDState``'s arguments; its defaults apply to the rest).
        process_group_backend: ``gloo`` (CPU), ``nccl`` (CUDA), ... (``None``: Lightning picks by device).
        start_method: how the ranks start when Lightning starts them: ``popen`` re-runs the command line
            once per extra rank (what ``trainer.strategy=ddp`` does; works from ``train.py``), ``spawn``
            starts them from this process (needs every object of the run to pickle). Ignored when the
            processes were started outside (torchrun, ``srun``).
        timeout: seconds a collective may wait (a number or a ``timedelta``; ``None``: torch's 30 minutes).
        **kwargs: Lightning's own ``DDPStrategy`` arguments (``ddp_comm_hook``, ``model_averaging_period``,
            ...) and ``DistributedDataParallel`` options (``find_unused_parameters``, ``static_graph``,
            ``bucket_cap_mb``, ``gradient_as_bucket_view``, ...). A hook given the Lightning way
            (``ddp_comm_hook=<callable>``) is registered on every device too.

    Raises:
        ConfigError: an unknown hook, hook option, backend, start method or keyword argument (named,
            with the valid choices), or a ``comm_hook`` name together with Lightning's ``ddp_comm_hook``.
    """

    def __init__(
        self,
        comm_hook: str = "none",
        comm_hook_options: Mapping[str, Any] | None = None,
        process_group_backend: str | None = None,
        start_method: str = "popen",
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        hook = CommHook(comm_hook, comm_hook_options)
        if process_group_backend is not None:
            backends = [b for b in dist.Backend.backend_list if b not in ("undefined", "fake")]
            check_choice("process_group_backend", process_group_backend, backends)
        check_choice("start_method", start_method, START_METHODS)
        if timeout is not None and not isinstance(timeout, timedelta):
            timeout = timedelta(seconds=check_number("timeout", timeout, low=0.0, low_inclusive=False))
        valid = sorted(_LIGHTNING_ARGS | set(_ddp_arguments()))
        for key, value in kwargs.items():
            if key not in valid:
                raise ConfigError(f"DDPStrategy: unknown argument {key}={value!r}; valid: comm_hook, comm_hook_options, "
                                  f"process_group_backend, start_method, timeout, {valid}.{did_you_mean(key, valid)}")
        if hook.name != "none" and (kwargs.get("ddp_comm_hook") is not None or kwargs.get("ddp_comm_wrapper") is not None):
            raise ConfigError(f"comm_hook={hook.name!r} and ddp_comm_hook/ddp_comm_wrapper both choose a communication "
                              "hook; DDP runs one. Give comm_hook by name, or Lightning's objects, not both.")
        extra = {} if timeout is None else {"timeout": timeout}
        super().__init__(process_group_backend=process_group_backend, start_method=start_method, **extra, **kwargs)
        self.comm_hook = hook
        #: what the registered hook returned: the ``PowerSGDState`` for powersgd (rank-local; set in each rank).
        self.comm_hook_state: Any = None

    def _register_ddp_hooks(self) -> None:
        """Register the hook on the DDP model whatever the device (Lightning's version does so on CUDA only)."""
        assert isinstance(self.model, DistributedDataParallel)
        if self._ddp_comm_hook is not None:  # given the Lightning way: Lightning's own helper, minus its CUDA check
            from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook

            _register_ddp_comm_hook(model=self.model, ddp_comm_state=self._ddp_comm_state,
                                    ddp_comm_hook=self._ddp_comm_hook, ddp_comm_wrapper=self._ddp_comm_wrapper)
        else:
            self.comm_hook_state = register_comm_hook(self.model, self.comm_hook.name, **self.comm_hook.options)
        registered = comm_hook_name(self.model)
        if registered is not None:
            rank_zero_info(f"DDPStrategy: gradient communication hook {registered} registered "
                           f"({self.root_device.type}, {self._get_process_group_backend()}).")


def processes_created_externally() -> bool:
    """True when this process is one rank of a group started outside Lightning (torchrun, ``srun``, ``jsrun``).

    The same environments Lightning detects (``TorchElasticEnvironment``, ``SLURMEnvironment``,
    ``LSFEnvironment``), plus ``LOCAL_RANK`` set by a launcher Lightning does not know.
    """
    return (TorchElasticEnvironment.detect() or SLURMEnvironment.detect() or LSFEnvironment.detect()
            or "LOCAL_RANK" in os.environ)


def multirun_strategy(strategy: str | Strategy) -> tuple[str | Strategy, str | None]:
    """The strategy a Hydra multirun job must use instead of ``strategy``, and why (``None``: keep it as it is).

    A DDP strategy whose ranks start by re-running the command line (Lightning's ``popen`` start method,
    the one of ``trainer.strategy=ddp`` and of ``DDPStrategy()``) re-runs the whole sweep from every
    extra rank inside a multirun (lightning-hydra-template #393). Such a strategy starts its ranks
    in-process instead: ``"ddp"`` becomes ``"ddp_spawn"`` (``ddp_find_unused_parameters_true`` ->
    ``ddp_spawn_find_unused_parameters_true``), a ``DDPStrategy`` object gets ``start_method="spawn"`` and
    keeps everything else (its comm hook, backend, DDP options). Kept as they are: every other strategy,
    and every strategy when the processes were created outside (torchrun, SLURM tasks): nothing is
    re-launched then, and spawning inside each of them would start ``devices`` ranks per rank.

    Args:
        strategy: ``trainer.strategy`` as given to the Trainer (a name or a ``Strategy`` object; an object is copied,
            not changed).
    """
    if processes_created_externally():
        return strategy, None
    if isinstance(strategy, str):
        if strategy == "ddp" or strategy.startswith("ddp_find_unused_parameters"):
            spawned = "ddp_spawn" + strategy[len("ddp"):]
            return spawned, (f"trainer.strategy={strategy!r} inside a Hydra multirun would re-run the sweep from every rank; "
                             f"using {spawned!r} (ranks started in-process).")
        return strategy, None
    if isinstance(strategy, _LightningDDPStrategy) and strategy._start_method == "popen":
        spawned_strategy = copy.copy(strategy)
        spawned_strategy._start_method = "spawn"
        return spawned_strategy, (f"trainer.strategy={type(strategy).__name__}(start_method='popen') inside a Hydra multirun "
                                  "would re-run the sweep from every rank; using start_method='spawn' (ranks started in-process).")
    return strategy, None
