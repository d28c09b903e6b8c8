"""Knowledge distillation (survey §3.2.1): losses, teachers, offline logits and pseudo-labels.

The Lightning glue is :class:`lightning_eff.callbacks.Distillation`.
"""
from .losses import (
    FEATURE_LOSSES,
    attention_kl_loss,
    attention_map,
    attention_transfer_loss,
    check_logit_shapes,
    check_temperature,
    check_weight,
    distillation_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    kd_loss,
    make_projection,
    soft_targets,
    task_loss,
)
from .offline import (
    TeacherLogitCache,
    compute_teacher_logits,
    model_fingerprint,
    pseudo_label,
)
from .teacher import check_not_student, freeze_teacher, load_teacher

__all__ = [
    "FEATURE_LOSSES", "attention_kl_loss", "attention_map", "attention_transfer_loss", "check_logit_shapes",
    "check_temperature", "check_weight", "distillation_loss", "hidden_cosine_loss", "hidden_mse_loss", "kd_loss",
    "make_projection", "soft_targets", "task_loss", "TeacherLogitCache", "compute_teacher_logits",
    "model_fingerprint", "pseudo_label", "check_not_student", "freeze_teacher", "load_teacher",
]
