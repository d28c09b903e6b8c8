"""The CPU memory allocator: keep freed tensor memory instead of page-faulting it back on every step.

Why: PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a large request with a
fresh ``mmap`` and returns it to the kernel on ``free`` (above its *mmap threshold*, 128 KiB at first,
raised dynamically up to 32 MiB), and gives the top of its heap back when more than the *trim threshold*
is free there. A training step allocates and frees the same activations every time, so each step maps
them again, and the kernel zeroes every page on its first touch: on the MobileNetV2 of ``make train``
(width 0.5, 32 px, batch 128, 2 threads) that was 20-48 thousand page faults and 70-140 ms of system
time per 330-400 ms step (AMD EPYC, AVX2, 2026-12-03). :func:`tune_cpu_allocator` sets glibc's
thresholds once per process (``mallopt``): allocations up to ``mmap_threshold_mb`` come from the heap,
and up to ``trim_threshold_mb`` of freed heap stays mapped for the next step. Measured: 80-330 faults
and 2-5 ms of system time per step, the float training step 0.72-0.82x as long (medians of 6 alternating
process pairs; ``python -m lightning_eff.bench training_efficiency`` measures it again) and ``make train``'s
float epochs 0.86x, with results identical to the last digit.

What it costs: freed memory up to the trim threshold stays in the process (resident memory stays at the
step's peak instead of falling between steps); nothing is allocated that the step did not need. What it
does not cover: glibc will not serve a single allocation above 32 MiB from the heap (``mallopt`` refuses
larger thresholds on 64-bit), so a model whose activations are larger (224-px inputs at large batch) still
maps those per step; an allocator with its own caching, preloaded before Python starts
(``LD_PRELOAD=libtcmalloc_minimal.so.4``, Debian ``libtcmalloc-minimal4``), covers them too — with a
preloaded tcmalloc, jemalloc or mimalloc, glibc's ``mallopt`` has no effect and is not called.

``cpu_allocator`` in the run config (and the :class:`~lightning_eff.callbacks.CPUAllocator` callback):

- ``auto`` (default): tune where it applies (glibc, no other allocator preloaded), else leave it;
- ``tuned``: tune, or a :class:`~lightning_eff.errors.ConfigError` saying why it cannot here;
- ``default``: leave the C library alone.

Example:
    >>> facts = allocator_facts()
    >>> sorted(facts)
    ['libc', 'preloaded']
    >>> resolve_cpu_allocator("default")["applied"]
    False
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import resource
from typing import Any

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_choice, check_number

__all__ = ["ALLOCATOR_MODES", "MAX_MMAP_THRESHOLD_MB", "allocator_facts", "check_allocator_options", "page_faults",
           "resolve_cpu_allocator", "tune_cpu_allocator", "tuned_thresholds"]

log = logging.getLogger(__name__)

ALLOCATOR_MODES = ("auto", "tuned", "default")
#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2): ``mallopt`` refuses anything larger.
MAX_MMAP_THRESHOLD_MB = 32
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_PRELOADED = ("tcmalloc", "jemalloc", "mimalloc")
_applied: dict[str, int] = {}  # what this process set (mallopt cannot be read back)


def check_allocator_options(mode: str = "auto", mmap_threshold_mb: float = MAX_MMAP_THRESHOLD_MB,
                            trim_threshold_mb: float = 1024, *, mode_name: str = "cpu_allocator") -> tuple[str, float, float]:
    """The validated ``(mode, mmap_threshold_mb, trim_threshold_mb)``; a ``ConfigError`` names a bad one."""
    return (check_choice(mode_name, mode, ALLOCATOR_MODES),
            check_number("mmap_threshold_mb", mmap_threshold_mb, low=0.125, high=MAX_MMAP_THRESHOLD_MB),
            check_number("trim_threshold_mb", trim_threshold_mb, low=0.125, high=1 << 20))


def allocator_facts() -> dict[str, Any]:
    """The C library (``"glibc 2.36"``, or ``None`` when it is not glibc) and any malloc replacement loaded
    into this process (``"tcmalloc"`` / ``"jemalloc"`` / ``"mimalloc"``, from ``/proc/self/maps``, else ``None``)."""
    name, version = platform.libc_ver()
    libc = f"{name} {version}" if name == "glibc" else None
    preloaded = None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            text = maps.read()
        preloaded = next((lib for lib in _PRELOADED if f"lib{lib}" in text), None)
    except OSError:  # not Linux: no maps to read
        preloaded = next((lib for lib in _PRELOADED if lib in os.environ.get("LD_PRELOAD", "")), None)
    return {"libc": libc, "preloaded": preloaded}


def tuned_thresholds() -> dict[str, int]:
    """The thresholds :func:`tune_cpu_allocator` set in this process (bytes), ``{}`` when it did not run."""
    return dict(_applied)


def tune_cpu_allocator(mmap_threshold_mb: float = MAX_MMAP_THRESHOLD_MB, trim_threshold_mb: float = 1024) -> dict[str, int]:
    """Set glibc's mmap and trim thresholds for this process (``mallopt``); returns the values set, in bytes.

    Args:
        mmap_threshold_mb: allocations up to this size come from the heap (reused) instead of a fresh
            ``mmap``; at most 32 (glibc's ceiling on 64-bit).
        trim_threshold_mb: freed memory at the top of the heap that stays mapped for reuse.

    Raises:
        ConfigError: a threshold out of range, a C library that is not glibc, or a malloc replacement
            already loaded (its own caching applies; glibc's settings would not).
    """
    _, mmap_mb, trim_mb = check_allocator_options("tuned", mmap_threshold_mb, trim_threshold_mb)
    facts = allocator_facts()
    if facts["libc"] is None:
        raise ConfigError("cpu_allocator='tuned' needs glibc (mallopt), and this process runs on another C library: "
                          "use cpu_allocator='auto' or 'default'.")
    if facts["preloaded"] is not None:
        raise ConfigError(f"cpu_allocator='tuned': {facts['preloaded']} is loaded in this process and serves malloc, so glibc's "
                          "thresholds would do nothing; use cpu_allocator='auto' or 'default'.")
    libc = ctypes.CDLL("libc.so.6")
    wanted = {"mmap_threshold": int(mmap_mb * (1 << 20)), "trim_threshold": int(trim_mb * (1 << 20))}
    for key, option in (("mmap_threshold", _M_MMAP_THRESHOLD), ("trim_threshold", _M_TRIM_THRESHOLD)):
        if libc.mallopt(option, wanted[key]) != 1:  # mallopt returns 1 on success
            raise ConfigError(f"glibc refused {key}={wanted[key]} bytes (mallopt returned 0).")
    _applied.update(wanted)
    return dict(wanted)


def resolve_cpu_allocator(mode: str = "auto", mmap_threshold_mb: float = MAX_MMAP_THRESHOLD_MB,
                          trim_threshold_mb: float = 1024) -> dict[str, Any]:
    """Apply ``cpu_allocator=mode`` (``auto`` / ``tuned`` / ``default``) once; returns what ``results.json`` records.

    ``{"mode": ..., "applied": bool, "reason": str, "thresholds": {...}, "facts": allocator_facts()}``;
    ``auto`` never raises for the machine (it says in ``reason`` why it left the allocator alone).
    """
    check_allocator_options(mode, mmap_threshold_mb, trim_threshold_mb)
    facts = allocator_facts()
    out: dict[str, Any] = {"mode": mode, "applied": False, "reason": "", "thresholds": {}, "facts": facts}
    if mode == "default":
        out["reason"] = "cpu_allocator='default': the C library's own behaviour"
    elif mode == "auto" and facts["libc"] is None:
        out["reason"] = "not glibc: left alone"
    elif mode == "auto" and facts["preloaded"] is not None:
        out["reason"] = f"{facts['preloaded']} is loaded and serves malloc: left alone"
    else:
        out["thresholds"] = tune_cpu_allocator(mmap_threshold_mb, trim_threshold_mb)
        out["applied"], out["reason"] = True, "glibc: freed tensor memory stays mapped for the next step"
    if out["applied"]:
        log.info("cpu_allocator=%r: glibc mmap threshold %d MiB, trim threshold %d MiB", mode,
                 out["thresholds"]["mmap_threshold"] >> 20, out["thresholds"]["trim_threshold"] >> 20)
    return out


def page_faults() -> int:
    """Minor page faults of this process so far (``getrusage``): the cost :func:`tune_cpu_allocator` removes."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
