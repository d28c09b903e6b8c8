"""Building and freezing a teacher from whatever the user has.

A teacher may be given as:

- an ``nn.Module`` (used as is);
- a Lightning checkpoint path (``*.ckpt``): loaded with ``teacher_class.load_from_checkpoint``
  (default :class:`~lightning_eff.tasks.ClassificationTask`), and its ``.model`` is the teacher;
- a Hugging Face model directory (holds ``config.json``): ``AutoModelForSequenceClassification``,
  offline (``local_files_only``), so a real pretrained BERT the user downloaded works;
- a registered model name or spec (``"mobilenetv2"`` or ``{"name": ..., **kwargs}``), optionally
  with ``checkpoint`` (a ``.ckpt`` or a plain ``state_dict`` file) holding its trained weights.

The teacher is then frozen: ``eval()``, ``requires_grad_(False)``; a teacher that *is* the
student, or shares a parameter with it, is refused (it would train itself toward itself).

Example:
    >>> t = freeze_teacher(nn.Linear(4, 2))
    >>> t.training, any(p.requires_grad for p in t.parameters())
    (False, False)
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

__all__ = ["load_teacher", "freeze_teacher", "check_not_student", "strip_prefix"]

log = logging.getLogger(__name__)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix`` with the prefix removed (all entries when none match)."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return sub or dict(state)


def _load_weights(model: nn.Module, path: str) -> nn.Module:
    if not Path(path).is_file():
        raise ConfigError(f"teacher checkpoint={path!r} does not exist.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = strip_prefix(state["state_dict"], "model.")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"teacher checkpoint={path!r} does not fit the teacher model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (first 5 shown). Check the teacher's name and options."
        )
    return model


def load_teacher(spec: Any, num_classes: int | None = None, teacher_class: type | None = None,
                 checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """Resolve ``spec`` (module, ``.ckpt`` path, HF directory, registry name or spec) to a teacher module.

    Args:
        spec: see the module docstring.
        num_classes: passed to registry models that do not set it.
        teacher_class: LightningModule class for ``.ckpt`` paths (default ``ClassificationTask``).
        checkpoint: weights for a registry model (``.ckpt`` with ``model.*`` keys, or a state dict).

    Raises:
        ConfigError: a path that does not exist, an unknown model name, or weights that do not fit.
    """
    if isinstance(spec, nn.Module):
        return _load_weights(spec, os.fspath(checkpoint)) if checkpoint is not None else spec
    if isinstance(spec, (str, os.PathLike)) and (Path(spec).suffix == ".ckpt" or Path(spec).expanduser().is_dir()):
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(f"teacher={str(spec)!r} is a folder without config.json; give a Hugging Face model folder.")
            from transformers import AutoModelForSequenceClassification

            return AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        if not path.is_file():
            raise ConfigError(f"teacher={str(spec)!r}: checkpoint file not found.")
        if teacher_class is None:
            from lightning_eff.tasks import ClassificationTask as teacher_class
        task = teacher_class.load_from_checkpoint(str(path), map_location="cpu", weights_only=False)
        return getattr(task, "model", task)
    from lightning_eff.models import create_model

    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(
            f"teacher={spec!r} must be an nn.Module, a .ckpt path, a Hugging Face model folder, a registered "
            "model name, or a spec {'name': ..., **options}."
        )
    kwargs = dict(spec)
    name = kwargs.pop("name")
    checkpoint = kwargs.pop("checkpoint", checkpoint)
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    model = create_model(name, **kwargs)
    if checkpoint is None:
        log.warning("teacher %r has no checkpoint: a randomly initialised teacher teaches nothing useful.", name)
        return model
    return _load_weights(model, os.fspath(checkpoint))


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """``eval()`` and no gradients; logs when the teacher had trainable parameters."""
    trainable = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    if trainable:
        log.info("Distillation: freezing the teacher (%d trainable parameters set to requires_grad=False).", trainable)
    teacher.requires_grad_(False)
    return teacher.eval()


def check_not_student(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher that is the student, contains it, or shares any parameter with it."""
    if teacher is student:
        raise ConfigError("the teacher is the student itself; give a separately trained (or copied) teacher model.")
    student_params = {id(p) for p in student.parameters()}
    shared = [n for n, p in teacher.named_parameters() if id(p) in student_params]
    if shared:
        raise ConfigError(
            f"the teacher shares {len(shared)} parameter(s) with the student (e.g. {shared[0]!r}); freezing it would "
            "freeze the student. Pass a copy (copy.deepcopy) or a separately loaded teacher."
        )
