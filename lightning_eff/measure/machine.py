"""What the machine is: CPU capability and the ISA flags int8/bf16 speed depends on.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["ISA_FLAGS", "cpu_capability", "cpu_flags"]

log = logging.getLogger(__name__)
_MiB = float(2**20)


def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()`` (``"AVX2"``, ``"AVX512"``, ...): int8/bf16 speed and some int8 numerics depend on it."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # very old builds / non-x86
        return "unknown"


#: The ISA flags (``/proc/cpuinfo`` names) int8 / bf16 kernels dispatch on: x86 (AVX2 + FMA for FBGEMM's
#: AVX2 path; AVX-512 F/BW/VL for its AVX-512 path; VNNI, AVX-512 or AVX-VNNI, for oneDNN's int8 dot products;
#: AVX-512 BF16 and AMX for bf16 / int8 matrix units) and ARM (``asimddp`` dot product, ``i8mm`` int8 matrix
#: multiply, used by QNNPACK / XNNPACK).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "asimddp", "i8mm")


def cpu_flags() -> dict[str, Any]:
    """The CPU facts every figure is recorded with: capability, model name, and the ISA flags that matter.

    ``capability`` is :func:`cpu_capability` (``torch.backends.cpu.get_cpu_capability()``); each
    name of :data:`ISA_FLAGS` maps to whether ``/proc/cpuinfo`` lists it (all False where that
    file cannot be read).
    """
    flags: set[str] = set()
    model = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")) and not flags:  # x86 / ARM
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"capability": cpu_capability(), "model": model, **{f: f in flags for f in ISA_FLAGS}}

