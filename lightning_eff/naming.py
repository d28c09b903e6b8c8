"""Names that survive wrappers and graph rewrites (the bottom of the surgery layer).

Why this module: pruning masks, sparse artifacts, distillation layer selectors and quantization
bookkeeping are keyed by module / parameter names, and several things rename them —
``torch.compile`` (``_orig_mod.``), activation-checkpoint wrappers
(``_checkpoint_wrapped_module.``), DDP (``module.``), and graph-mode QAT, which fuses
``conv`` + ``bn`` into one module (``bn.weight`` becomes ``conv.bn.weight``). Everything that
writes names for a user to load later writes the *float network's* names, via
:func:`float_state_dict`; it depends on torch only, so any layer may import it.

Example:
    >>> canonical_name("module._orig_mod.features._checkpoint_wrapped_module.0.weight")
    'features.0.weight'
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["WRAPPER_PREFIXES", "canonical_name", "record_float_keys", "float_keys", "float_state_dict", "is_quant_state_key", "tensor_names"]

#: Path segments that wrappers insert; ``module.`` (DDP/DataParallel) only as the first segment.
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_FLOAT_KEYS = "_lightning_eff_float_keys"
# Observer / fake-quant state of a QAT- or PTQ-prepared graph (scales, ranges, flags): not weights.
_QUANT_STATE = re.compile(r"(activation_post_process|_fake_quant)")


def canonical_name(name: str) -> str:
    """``name`` without the segments wrappers insert (``module.`` at the front, ``_orig_mod.`` anywhere, ...)."""
    if name.startswith("module."):
        name = name[len("module."):]
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def is_quant_state_key(key: str) -> bool:
    """Whether a state-dict key is observer / fake-quant bookkeeping rather than a weight or BN statistic."""
    return bool(_QUANT_STATE.search(key))


def record_float_keys(rewritten: nn.Module, original_names: Mapping[int, str]) -> dict[str, str]:
    """Remember, on ``rewritten``, which float-network key each of its state tensors came from.

    ``original_names`` maps ``id(tensor)`` to its key in the original network, taken *before* the
    rewrite (fusion and prepare move the same tensor objects into new modules). Returns the map
    ``{rewritten key: float key}``; a deep copy of ``rewritten`` keeps it.
    """
    mapping = {k: original_names[id(t)] for k, t in rewritten.state_dict(keep_vars=True).items() if id(t) in original_names}
    rewritten.__dict__[_FLOAT_KEYS] = mapping
    if isinstance(getattr(rewritten, "meta", None), dict):  # GraphModule.__deepcopy__ keeps only .meta
        rewritten.meta[_FLOAT_KEYS] = mapping
    return mapping


def float_keys(model: nn.Module) -> dict[str, str] | None:
    """The ``{key: float-network key}`` map recorded by :func:`record_float_keys`, or ``None``."""
    mapping = model.__dict__.get(_FLOAT_KEYS)
    if mapping is None and isinstance(getattr(model, "meta", None), dict):
        mapping = model.meta.get(_FLOAT_KEYS)
    return mapping


def float_state_dict(model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The weights of ``model`` under the names of the user's float network.

    A rewritten graph (QAT/PTQ-prepared) is mapped back through its recorded keys; observer and
    fake-quant state is dropped; wrapper prefixes are stripped. A plain network's state dict comes
    back as it is (canonicalised).
    """
    if not isinstance(model, nn.Module):
        return {canonical_name(k): v for k, v in dict(model).items() if not is_quant_state_key(k)}
    renamed: dict[str, str] = {}  # full key -> float key, from every rewritten graph inside (e.g. a QAT'd submodule)
    for prefix, module in model.named_modules():
        mapping = float_keys(module)
        if mapping:
            head = f"{prefix}." if prefix else ""
            renamed.update({head + k: head + v for k, v in mapping.items()})
    return {canonical_name(renamed.get(k, k)): v for k, v in model.state_dict().items()
            if k in renamed or not is_quant_state_key(k)}


def tensor_names(model: nn.Module) -> dict[int, str]:
    """``{id(tensor): key}`` over ``model``'s state (parameters and buffers), for :func:`record_float_keys`."""
    return {id(t): k for k, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
