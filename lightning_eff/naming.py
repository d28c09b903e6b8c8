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
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["WRAPPER_PREFIXES", "canonical_name", "unwrap_model", "remap_keys", "record_float_keys", "float_keys", "float_state_dict", "is_quant_state_key", "tensor_names"]

#: Path segments that wrappers insert; ``module.`` (DDP/DataParallel) only as the first segment.
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
_WRAPPER_SEGMENTS = frozenset(p.rstrip(".") for p in WRAPPER_PREFIXES)
_FLOAT_KEYS = "_lightning_eff_float_keys"
# Observer / fake-quant state of a QAT- or PTQ-prepared graph (scales, ranges, flags): not weights.
_QUANT_STATE = re.compile(r"(activation_post_process|_fake_quant)")


def canonical_name(name: str) -> str:
    """``name`` without the path segments wrappers insert (``module`` first, ``_orig_mod`` / checkpoint wrappers anywhere).

    A wrapper's own path (``features._checkpoint_wrapped_module``) becomes the wrapped module's name
    (``features``).
    """
    parts = name.split(".")
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p not in _WRAPPER_SEGMENTS)


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside the wrappers that rename it: DDP/DataParallel ``.module``, ``torch.compile``'s
    ``._orig_mod``, a top-level checkpoint wrapper's ``._checkpoint_wrapped_module`` (repeatedly)."""
    for _ in range(8):
        inner = None
        for attr in sorted(_WRAPPER_SEGMENTS):
            inner = inner or model.__dict__.get("_modules", {}).get(attr)
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def remap_keys(state: Mapping[str, object], target_keys: object) -> dict[str, object]:
    """``state`` with each key renamed to the key of ``target_keys`` that has the same :func:`canonical_name`.

    How a checkpoint written from a wrapped network (``torch.compile``'s ``_orig_mod.``, checkpoint
    wrappers, ``module.``) loads into the plain one, and the reverse. Keys already in ``target_keys``,
    and keys with no (or no unique) counterpart, are kept as they are, so a real mismatch still fails
    loudly where the state is loaded. A state dict's ``_metadata`` (the module versions
    ``load_state_dict`` needs) is kept, renamed alike; nothing to rename returns ``state`` itself.

    Example:
        >>> remap_keys({"net._orig_mod.fc.weight": 1, "step": 2}, ["net.fc.weight"])
        {'net.fc.weight': 1, 'step': 2}
    """
    targets = list(target_keys)
    present = set(targets)
    by_canonical: dict[str, list[str]] = {}
    for key in targets:
        by_canonical.setdefault(canonical_name(key), []).append(key)
    renamed: dict[str, str] = {}
    for key in state:
        if key not in present:
            match = by_canonical.get(canonical_name(key), [])
            if len(match) == 1:
                renamed[key] = match[0]
    if not renamed:
        return state  # untouched, with its ``_metadata`` (module versions that load_state_dict relies on)
    out = type(state)() if isinstance(state, OrderedDict) else {}
    for key, value in state.items():
        out[renamed.get(key, key)] = value
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # per-module versions (e.g. observers reset ``eps`` for version-less state)
        prefixes: dict[str, str] = {}
        for old, new in renamed.items():
            prefixes[old.rpartition(".")[0]] = new.rpartition(".")[0]
        out._metadata = type(metadata)((prefixes.get(k, k), v) for k, v in metadata.items())
    return out
