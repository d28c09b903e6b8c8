"""A pretrained backbone into a fresh model: every tensor but the head's must match.

Why a module of its own: ``create_model(..., backbone_ckpt=...)`` (the registry) and the stage hand-over
(``hands_over: backbone``) both need it, and the registry must not import :mod:`.loading` (which imports
the registry). This module imports nothing of the package but the floor.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lightning_eff.errors import ConfigError

__all__ = ["strip_prefix", "read_state", "head_prefixes", "load_backbone"]


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix`` with the prefix removed (all entries when none match)."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return sub or dict(state)


def read_state(path: str | os.PathLike, option: str) -> dict[str, torch.Tensor]:
    """The network weights in a file: a Lightning ``.ckpt`` (its ``model.*`` entries) or a state dict."""
    path = os.fspath(path)
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"{option}={path!r} does not exist; give the .ckpt a pretraining stage wrote "
                          "(e.g. outputs/.../simclr/simclr.ckpt) or a state-dict file.")
    state = torch.load(os.path.expanduser(path), map_location="cpu", weights_only=False)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = strip_prefix(state["state_dict"], "model.")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{option}={path!r} holds no state dict (a mapping of tensors) nor a Lightning checkpoint.")
    return dict(state)


def head_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes of ``model``'s output head: what a pretrained backbone does not need to provide.

    timm's ``get_classifier()``, a Hugging Face ``classifier`` (and BERT's pooler, which MLM does not train),
    else the last ``nn.Linear`` in module order.
    """
    names = {id(m): n for n, m in model.named_modules()}
    heads: list[str] = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            head = get_classifier()
        except (TypeError, AttributeError, NotImplementedError):
            head = None
        if isinstance(head, nn.Module) and id(head) in names:
            heads.append(names[id(head)])
    for name, _module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("classifier", "pooler") and name not in heads:
            heads.append(name)
    if not heads:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        heads = linears[-1:]
    return [h + "." if h else "" for h in heads]


def load_backbone(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module,
                  option: str = "model.backbone_ckpt") -> list[str]:
    """Copy a pretrained backbone into ``model``: every tensor but the head's must be present with its shape.

    ``source`` is a ``.ckpt`` / state-dict path, a state dict or a module. The head (:func:`head_prefixes`)
    may be missing or of another shape (another number of classes): it keeps its fresh initialisation.
    Returns the names copied.

    Raises:
        ConfigError: backbone tensors missing from ``source``, tensors of ``source`` the model lacks, or shapes
            that differ outside the head; the message names them (missing / unexpected / shape).
    """
    if isinstance(source, nn.Module):
        src, where = source.state_dict(), f"{option} ({type(source).__name__})"
    elif isinstance(source, Mapping):
        src, where = dict(source), option
    else:
        src, where = read_state(source, option), f"{option}={os.fspath(source)!r}"
    dst = model.state_dict()
    heads = head_prefixes(model)
    in_head = lambda k: any(k.startswith(h) for h in heads)  # noqa: E731
    missing = sorted(k for k in dst if k not in src and not in_head(k))
    unexpected = sorted(k for k in src if k not in dst and not in_head(k))
    shapes = sorted(k for k in dst if k in src and src[k].shape != dst[k].shape and not in_head(k))
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{where} does not fit the model's backbone ({type(model).__name__}): {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, {len(shapes)} of another shape "
            f"{[(k, tuple(src[k].shape), tuple(dst[k].shape)) for k in shapes[:3]]} (first ones shown; the head "
            f"{[h.rstrip('.') for h in heads]} may differ). Pretrain the same model (name and options) as the one fine-tuned."
        )
    copied = [k for k in dst if k in src and src[k].shape == dst[k].shape]
    model.load_state_dict({k: src[k] for k in copied}, strict=False)
    return copied
