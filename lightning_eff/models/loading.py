"""Loading a model from what a user has: a module, a Lightning ``.ckpt``, a state dict, a Hugging Face folder.

Why here, in ``models/``: the teacher of distillation, the initialisation of a BERT student and
the hand-over between stages all need "a network from this path", and they sit in different
layers. This module imports only the model registry and the floor — never ``tasks`` or
``learning`` — so every layer above may use it. A Lightning checkpoint is read directly: its
``hyper_parameters["model"]`` spec builds the network and its ``model.*`` weights fill it (pass
``task_class`` to use a LightningModule's own ``load_from_checkpoint`` instead).

Example:
    >>> import tempfile, os
    >>> net = create_model("plain_cnn", width=0.25, num_classes=3)
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt"); torch.save(net.state_dict(), path)
    >>> again = load_model({"name": "plain_cnn", "width": 0.25, "num_classes": 3}, checkpoint=path)
    >>> all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    True
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_eff.errors import ConfigError
from lightning_eff.models.registry import create_model

__all__ = ["load_model", "load_weights", "strip_prefix", "load_backbone", "head_prefixes", "read_state"]

log = logging.getLogger(__name__)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix`` with the prefix removed (all entries when none match)."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return sub or dict(state)


def load_weights(model: nn.Module, path: str | os.PathLike, option: str = "checkpoint") -> nn.Module:
    """Fill ``model`` from a state-dict file or a Lightning ``.ckpt`` (its ``model.*`` entries); strict.

    Raises:
        ConfigError: no such file, or weights that do not fit (missing / unexpected keys named).
    """
    path = os.fspath(path)
    if not Path(path).is_file():
        raise ConfigError(f"{option}={path!r} does not exist.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = strip_prefix(state["state_dict"], "model.")
    return _fill(model, state, f"{option}={path!r}")


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


def _fill(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """``model.load_state_dict(state)``, or a ConfigError naming ``source`` and the keys that do not fit."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{source} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (first 5 shown). Check the model's name and options."
        )
    return model


def _from_lightning_checkpoint(path: Path, task_class: type | None, option: str) -> nn.Module:
    if task_class is not None:
        task = task_class.load_from_checkpoint(str(path), map_location="cpu", weights_only=False)
        return getattr(task, "model", task)
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    spec = (ckpt.get("hyper_parameters") or {}).get("model") if isinstance(ckpt, Mapping) else None
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(
            f"{option}={str(path)!r}: the checkpoint records no model spec (hyper_parameters['model'] with a 'name'); "
            "pass the LightningModule class that wrote it (teacher_class=...), or give {'name': ..., 'checkpoint': path}."
        )
    kwargs = dict(spec)
    kwargs.pop("backbone_ckpt", None)  # the checkpoint's own weights replace the backbone it started from
    model = create_model(kwargs.pop("name"), **kwargs)
    return _fill(model, strip_prefix(ckpt["state_dict"], "model."), f"{option}={str(path)!r} ({spec['name']!r})")


def load_model(spec: Any, num_classes: int | None = None, task_class: type | None = None,
               checkpoint: str | os.PathLike | None = None, option: str = "model") -> nn.Module:
    """Resolve ``spec`` to a network.

    Args:
        spec: an ``nn.Module`` (used as is); a Lightning ``.ckpt`` path; a Hugging Face model folder
            (``config.json``; ``AutoModelForSequenceClassification``, offline); a registered model name or
            spec ``{"name": ..., **options}`` (optionally with ``checkpoint``).
        num_classes: passed to registry models that do not set it.
        task_class: LightningModule class whose ``load_from_checkpoint`` reads a ``.ckpt`` (default: read it directly).
        checkpoint: weights for a module or registry model (``.ckpt`` with ``model.*`` keys, or a state dict).
        option: the option name used in errors (``"teacher"``, ``"init_from"``, ...).

    Raises:
        ConfigError: a path that does not exist, an unknown model name, or weights that do not fit.
    """
    if isinstance(spec, nn.Module):
        return load_weights(spec, checkpoint, f"{option}.checkpoint") if checkpoint is not None else spec
    if isinstance(spec, (str, os.PathLike)) and (Path(spec).suffix == ".ckpt" or Path(spec).expanduser().is_dir()):
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(f"{option}={str(spec)!r} is a folder without config.json; give a Hugging Face model folder.")
            from transformers import AutoModelForSequenceClassification

            return AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        if not path.is_file():
            raise ConfigError(f"{option}={str(spec)!r}: checkpoint file not found.")
        return _from_lightning_checkpoint(path, task_class, option)
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(
            f"{option}={spec!r} must be an nn.Module, a .ckpt path, a Hugging Face model folder, a registered "
            "model name, or a spec {'name': ..., **options}."
        )
    kwargs = dict(spec)
    name = kwargs.pop("name")
    checkpoint = kwargs.pop("checkpoint", checkpoint)
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    model = create_model(name, **kwargs)
    if checkpoint is None:
        log.warning("%s %r has no checkpoint: its weights are randomly initialised.", option, name)
        return model
    return load_weights(model, checkpoint, f"{option}.checkpoint")
