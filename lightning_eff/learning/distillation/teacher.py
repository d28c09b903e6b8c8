"""Building and freezing a teacher from whatever the user has.

A teacher may be given as:

- an ``nn.Module`` (used as is);
- a Lightning checkpoint path (``*.ckpt``): loaded with ``teacher_class.load_from_checkpoint``
  or, without ``teacher_class``, rebuilt from its recorded model spec and ``model.*`` weights;
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
from typing import Any

from torch import nn

from lightning_eff.errors import ConfigError
from lightning_eff.models.loading import load_model, strip_prefix

__all__ = ["load_teacher", "freeze_teacher", "check_not_student", "strip_prefix"]  # strip_prefix: from models.loading

log = logging.getLogger(__name__)


def load_teacher(spec: Any, num_classes: int | None = None, teacher_class: type | None = None,
                 checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """Resolve ``spec`` (module, ``.ckpt`` path, HF directory, registry name or spec) to a teacher module.

    :func:`lightning_eff.models.loading.load_model` with the errors naming ``teacher``.

    Args:
        spec: see the module docstring.
        num_classes: passed to registry models that do not set it.
        teacher_class: LightningModule class for ``.ckpt`` paths (default: the checkpoint's own model spec).
        checkpoint: weights for a registry model (``.ckpt`` with ``model.*`` keys, or a state dict).

    Raises:
        ConfigError: a path that does not exist, an unknown model name, or weights that do not fit.
    """
    return load_model(spec, num_classes, task_class=teacher_class, checkpoint=checkpoint, option="teacher")


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
