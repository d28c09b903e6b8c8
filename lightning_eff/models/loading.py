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
from lightning_eff.models.backbone import (
    head_prefixes,
    load_backbone,
    read_state,
    strip_prefix,
)
from lightning_eff.models.registry import create_model

__all__ = ["load_model", "load_weights", "strip_prefix", "load_backbone", "head_prefixes", "read_state"]

log = logging.getLogger(__name__)


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
        hparams = (torch.load(str(path), map_location="cpu", weights_only=False).get("hyper_parameters") or {})
        model_spec = hparams.get("model")
        # a fine-tuned model's spec names the backbone it started from; its own weights replace that backbone
        extra = ({"model": {k: v for k, v in model_spec.items() if k != "backbone_ckpt"}}
                 if isinstance(model_spec, Mapping) and "backbone_ckpt" in model_spec else {})
        task = task_class.load_from_checkpoint(str(path), map_location="cpu", weights_only=False, **extra)
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
