"""Counting what a model costs: parameters, non-zeros, bytes, MACs.

Plain PyTorch; works on float, pruned (parametrized), torch.ao quantized and TorchScript models.
"""
from __future__ import annotations

import gzip
import io
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.batch import call_with_inputs, flatten
from lightning_eff.measure.timing import inference
from lightning_eff.naming import unwrap_model

__all__ = ["weight_tensors", "count_parameters", "count_nonzero_parameters", "serialize_state_dict", "state_dict_bytes", "gzip_size", "file_bytes", "count_macs"]

log = logging.getLogger(__name__)
_MiB = float(2**20)


_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original$")


def weight_tensors(model: nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(stored, effective)`` for every unique weight-like tensor of ``model``.

    ``stored`` is what occupies memory; ``effective`` is the weight the forward pass uses
    (``orig * mask`` for a pruning reparametrization, the dequantized values of an int8 weight).

    Why the state_dict and not ``.parameters()``: converted ``torch.ao`` modules keep their
    weights in packed params (a C++ object) that ``.parameters()`` does not see; their
    ``state_dict`` unpacks them as quantized tensors or ``(weight, bias)`` tuples. Buffers (BN
    statistics, pruning masks, observer state) and quantization metadata (scale, zero_point)
    are not parameters and are skipped.
    """
    state = model.state_dict(keep_vars=True)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    seen: set[int] = set()
    for key, value in state.items():
        leaf = key.rsplit(".", 1)[-1]
        if key in params:
            tensors = [value]
        elif key in buffers:
            continue
        elif isinstance(value, (tuple, list)):  # packed params of quantized Linear: (weight, bias)
            tensors = [t for t in flatten(value) if isinstance(t, Tensor)]
        elif isinstance(value, Tensor) and (value.is_quantized or leaf in ("weight", "bias")):
            tensors = [value]  # quantized conv weight/bias written by _save_to_state_dict
        else:
            continue
        for tensor in tensors:
            if id(tensor) in seen:  # tied weights appear under several keys as the same object
                continue
            seen.add(id(tensor))
            yield tensor, _effective(model, state, key, tensor)
    if isinstance(model, torch.jit.ScriptModule):
        for tensor in _scripted_packed_tensors(model):
            yield tensor, tensor.dequantize() if tensor.is_quantized else tensor.detach()


def _scripted_packed_tensors(model: torch.jit.ScriptModule) -> Iterator[Tensor]:
    """Weights a scripted quantized model keeps in packed-params ScriptObjects (absent from its state_dict).

    Their ``__getstate__`` holds the weight (quantized) and bias (float) besides integer
    configuration tensors (stride, padding), which are not parameters and are skipped.
    """
    for _, module in model.named_modules():
        for attr in ("_packed_params", "_packed_weight"):
            if not module._c.hasattr(attr):
                continue
            packed = module._c.getattr(attr)
            if not isinstance(packed, torch.ScriptObject):
                continue
            try:
                state = packed.__getstate__()
            except (AttributeError, RuntimeError):
                continue
            for item in flatten(state):
                if isinstance(item, Tensor) and (item.is_quantized or item.is_floating_point()):
                    yield item


def _effective(model: nn.Module, state: Mapping[str, Any], key: str, tensor: Tensor) -> Tensor:
    if tensor.is_quantized:
        # (q - zero_point) * scale is exactly 0.0 for a weight that quantized to its zero point.
        return tensor.dequantize()
    if key.endswith("_orig") and isinstance(state.get(key[: -len("_orig")] + "_mask"), Tensor):
        return tensor.detach() * state[key[: -len("_orig")] + "_mask"]  # torch.nn.utils.prune
    match = _PARAMETRIZED.match(key)
    if match:  # torch.nn.utils.parametrize: the effective tensor is the parametrized attribute
        return getattr(model.get_submodule(match.group(1) or ""), match.group(2)).detach()
    return tensor.detach()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; shared tensors once, a pruned ``weight_orig`` as the weight it stands for.

    Works for quantized (converted) models, whose weights are read from the state_dict.
    """
    return sum(stored.numel() for stored, _ in weight_tensors(model))


def count_nonzero_parameters(model: nn.Module) -> int:
    """Number of non-zero entries of the *effective* weights (``orig * mask`` when pruned)."""
    return sum(int(torch.count_nonzero(effective)) for _, effective in weight_tensors(model))


def serialize_state_dict(model: nn.Module) -> bytes:
    """``torch.save(model.state_dict())`` into memory: the bytes a checkpoint of the weights takes."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def state_dict_bytes(model: nn.Module) -> int:
    """Size in bytes of ``torch.save(model.state_dict())``."""
    return len(serialize_state_dict(model))


def gzip_size(data: bytes | bytearray | str | os.PathLike) -> int:
    """Size after gzip at level 9 of ``data`` (bytes) or of the file at ``data`` (path).

    Compressed size is the survey's proxy for the download cost of a sparse or clustered model:
    zeros and repeated values compress, dense float noise does not.
    """
    if not isinstance(data, (bytes, bytearray)):
        data = Path(data).read_bytes()
    return len(gzip.compress(bytes(data), compresslevel=9, mtime=0))


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a file on disk in bytes."""
    return os.path.getsize(path)


def _quantized_macs_hooks(model: nn.Module, total: list[int]) -> list[Any]:
    """Count MACs of converted ``torch.ao`` conv/linear modules, which FlopCounterMode does not see.

    The quantized kernels dispatch to ``quantized::conv2d``/``linear`` ops that have no FLOP
    formula; an int8 model does the same multiply-accumulates as its float parent, so we count
    them from the module shapes: conv = out.numel() * in_channels/groups * prod(kernel), linear =
    out.numel() * in_features.
    """
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd

    conv_types = (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.ConvTranspose1d, nnq.ConvTranspose2d, nnq.ConvTranspose3d)
    linear_types = (nnq.Linear, nnqd.Linear)

    def conv_hook(module: nn.Module, _args: Any, out: Tensor) -> None:
        total[0] += out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def linear_hook(module: nn.Module, _args: Any, out: Tensor) -> None:
        total[0] += out.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, conv_types):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, linear_types):
            handles.append(module.register_forward_hook(linear_hook))
    return handles


def count_macs(model: Callable[..., Any], example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (eval mode, no grad).

    Uses ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per MAC for matmul
    and conv), plus shape-based counts for converted quantized conv/linear modules.

    Raises:
        RuntimeError: the model holds quantized weights but nothing was counted (e.g. a
            TorchScript int8 module, whose quantized ops neither the counter nor hooks see).
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = unwrap_model(model) if isinstance(model, nn.Module) else model  # count the network, not its wrapper
    quantized_macs = [0]
    handles = _quantized_macs_hooks(model, quantized_macs) if isinstance(model, nn.Module) else []
    try:
        with inference(model), FlopCounterMode(display=False) as counter:
            call_with_inputs(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    macs = counter.get_total_flops() // 2 + quantized_macs[0]
    if macs == 0 and isinstance(model, nn.Module) and any(s.is_quantized for s, _ in weight_tensors(model)):
        raise RuntimeError(f"cannot count MACs of {type(model).__name__}: its quantized ops are invisible to FlopCounterMode")
    return int(macs)

