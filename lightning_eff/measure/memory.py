"""Peak memory of a forward pass and of the whole process.
"""
from __future__ import annotations

import logging
import os
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_eff.batch import call_with_inputs, first_tensor
from lightning_eff.measure.timing import inference

__all__ = ["peak_memory_mb", "process_peak_rss_mb"]

log = logging.getLogger(__name__)
_MiB = float(2**20)


def peak_memory_mb(model: Callable[..., Any], example_inputs: Any) -> float:
    """Peak memory (MiB) allocated by one forward pass, beyond weights and inputs already held.

    CPU method: one warm-up call, then one call under ``torch.profiler.profile(profile_memory=True)``;
    the profiler records every allocator event (``+bytes`` on allocation, ``-bytes`` on free);
    summing them in time order gives the live bytes at each instant, whose maximum is the peak
    of activations, workspaces and outputs. On CUDA, ``torch.cuda.max_memory_allocated`` minus
    the memory allocated before the call.
    """
    tensor = first_tensor(example_inputs)
    with inference(model):
        call_with_inputs(model, example_inputs)
        if tensor is not None and tensor.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(tensor.device)
            before = torch.cuda.memory_allocated(tensor.device)
            call_with_inputs(model, example_inputs)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated(tensor.device) - before) / _MiB
        from torch.profiler import ProfilerActivity, profile

        with _quiet_kineto(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call_with_inputs(model, example_inputs)
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / _MiB


@contextmanager
def _quiet_kineto() -> Iterator[None]:
    """Keep the profiler's back end (kineto) from writing its own lines to stderr, unless the user set its level.

    Kineto logs through its own logger, not Python's: ``USDT: ... profiler_start`` / ``profiler_stop`` on every
    profile and, on a CUDA build of torch without a usable CUDA driver, ``ERROR: ... DeviceProperties.cpp:56]
    gpuGetDeviceCount failed with code 35`` (cudaErrorInsufficientDriver) the first time a trace is
    post-processed, even a CPU-only one: kineto asks the CUDA runtime for the GPUs' properties to write
    the trace's metadata. Neither says anything about the measurement. Kineto reads ``KINETO_LOG_LEVEL`` once,
    when the first profile of the process starts; 6 is above its highest severity (USDT = 5). So this
    keeps every later profile of the process quiet too; ``KINETO_LOG_LEVEL=4`` (or any value) set by the
    user is left alone.
    """
    if "KINETO_LOG_LEVEL" in os.environ:
        yield
        return
    os.environ["KINETO_LOG_LEVEL"] = "6"
    try:
        yield
    finally:
        os.environ.pop("KINETO_LOG_LEVEL", None)


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB), from ``resource.getrusage``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MiB if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux

