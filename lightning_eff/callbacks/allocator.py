"""``CPUAllocator``: keep freed tensor memory mapped between training steps (glibc), as one callback.

The functional core is :mod:`lightning_eff.training.allocator` (why, what it measured, what it costs).
The setting is per process, so the callback applies it in ``setup()`` of every process that trains
(each DDP rank, however it was launched); applying it again is harmless. ``python train.py`` needs no
callback: the run config's ``cpu_allocator`` (default ``auto``) applies it before the data loads.

Example:
    >>> from lightning_eff.callbacks import CPUAllocator
    >>> cb = CPUAllocator(mode="auto")
"""
from __future__ import annotations

from typing import Any

import lightning as L

from lightning_eff.callbacks.base import EffCallback
from lightning_eff.training.allocator import (
    MAX_MMAP_THRESHOLD_MB,
    check_allocator_options,
    resolve_cpu_allocator,
)

__all__ = ["CPUAllocator"]


class CPUAllocator(EffCallback):
    """Tune the C library's allocator for training on CPU (see :mod:`lightning_eff.training.allocator`).

    Args:
        mode: ``"auto"`` (glibc without a preloaded tcmalloc/jemalloc/mimalloc: tune; else leave it),
            ``"tuned"`` (tune or raise ``ConfigError`` saying why not) or ``"default"`` (leave it).
        mmap_threshold_mb: allocations up to this size are served from the reused heap (at most 32).
        trim_threshold_mb: freed heap memory that stays mapped between steps.

    After ``setup()``, ``self.result`` holds what was done (``applied``, ``reason``, ``thresholds``, ``facts``).
    A process has one allocator: the thresholds applied last (this callback's, a second instance's, the
    CLI's ``cpu_allocator``) are the ones in force; :func:`~lightning_eff.training.allocator.tuned_thresholds`
    says which.
    """

    def __init__(self, mode: str = "auto", mmap_threshold_mb: float = MAX_MMAP_THRESHOLD_MB, trim_threshold_mb: float = 1024) -> None:
        super().__init__(module_attr=None)
        self.mode, self.mmap_threshold_mb, self.trim_threshold_mb = check_allocator_options(
            mode, mmap_threshold_mb, trim_threshold_mb, mode_name="mode")
        self.result: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:  # noqa: D102
        return self.state_key_of(mode=self.mode, mmap_threshold_mb=self.mmap_threshold_mb, trim_threshold_mb=self.trim_threshold_mb)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        super().setup(trainer, pl_module, stage)
        self.result = resolve_cpu_allocator(self.mode, self.mmap_threshold_mb, self.trim_threshold_mb)
