"""Peak memory of a forward pass and of the whole process.
"""
from __future__ import annotations

import logging
import resource
import sys
from collections.abc import Callable
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

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB), from ``resource.getrusage``."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / _MiB if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB on Linux

