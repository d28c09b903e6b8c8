"""Distillation losses (survey §3.2.1), plain PyTorch.

Logit distillation (Hinton et al., 2015, arXiv:1503.02531), the survey's equations 4 and 5:

- soft targets ``p_T = softmax(z_T / T)`` (eq. 4; ``T > 1`` reveals the teacher's "dark
  knowledge", the relative probabilities of wrong classes);
- ``L = λ1 · CE(y, softmax(z_S)) + λ2 · T² · KL(p_T ‖ softmax(z_S / T))`` (eq. 5). The ``T²``
  keeps the soft term's gradient magnitude independent of ``T`` (its gradient scales as 1/T²).

Intermediate layers:

- hidden-state MSE with a learned projection when widths differ (FitNets, Romero et al., 2015;
  TinyBERT), and the cosine embedding loss on hidden states of DistilBERT (Sanh et al., 2019);
- attention transfer for CNNs (Zagoruyko & Komodakis, 2017, arXiv:1612.03928): the spatial map
  ``Q = mean_c |F_c|^p``, L2-normalised, compared with an L2 distance;
- attention-matrix KL for transformers (TinyBERT / MiniLM): KL between the teacher's and the
  student's attention distributions of every query position.

Every loss checks shapes and says which tensor disagrees (upstream ``F.kl_div`` silently broadcasts
a batch-size mismatch, and ``T <= 0`` gives NaN).

Example:
    >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
    >>> kd_loss(t, t, temperature=4.0).item()
    0.0
    >>> out = distillation_loss(s, t, torch.tensor([1, 2, 3, 4]), temperature=2.0, task_weight=0.5, kd_weight=0.5)
    >>> sorted(out)
    ['kd', 'loss', 'task']
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_number

__all__ = [
    "check_temperature",
    "check_weight",
    "check_logit_shapes",
    "soft_targets",
    "task_loss",
    "kd_loss",
    "distillation_loss",
    "hidden_mse_loss",
    "hidden_cosine_loss",
    "attention_map",
    "attention_transfer_loss",
    "attention_kl_loss",
    "FEATURE_LOSSES",
    "make_projection",
]


def check_temperature(name: str, value) -> float:
    """A distillation temperature: a finite number > 0 (``T <= 0`` would divide by zero / flip signs)."""
    check_number(name, value, low=0.0, low_inclusive=False)
    if not math.isfinite(float(value)):
        raise ConfigError(f"{name}={value!r} must be a finite temperature > 0 (typical values 1-10).")
    return float(value)


def check_weight(name: str, value) -> float:
    """A loss weight (the survey's λ1/λ2) in ``[0, 1]``."""
    return float(check_number(name, value, low=0.0, high=1.0))


def check_logit_shapes(student: Tensor, teacher: Tensor) -> None:
    """Student and teacher logits must both be ``[B, C]`` with the same ``B`` and ``C``.

    Raises:
        ConfigError: naming both shapes and which dimension differs.
    """
    if student.ndim != 2 or teacher.ndim != 2:
        raise ConfigError(
            f"distillation needs logits of shape [batch, classes]; got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}. Pass an output extractor (output_fn) that returns the logits."
        )
    if student.shape[0] != teacher.shape[0]:
        raise ConfigError(
            f"batch-size mismatch: student logits {tuple(student.shape)} vs teacher logits {tuple(teacher.shape)}; "
            "the teacher must see the same examples as the student."
        )
    if student.shape[1] != teacher.shape[1]:
        raise ConfigError(
            f"class-count mismatch: student logits {tuple(student.shape)} have {student.shape[1]} classes, teacher "
            f"logits {tuple(teacher.shape)} have {teacher.shape[1]}; both must be trained on the same label set."
        )


def soft_targets(teacher_logits: Tensor, temperature: float) -> Tensor:
    """The survey's equation 4: ``softmax(z_T / T)``."""
    temperature = check_temperature("temperature", temperature)
    return torch.softmax(teacher_logits.float() / temperature, dim=-1)


def task_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with hard labels (``int [B]``) or soft/mixed labels (``float [B, C]``, rows sum to 1)."""
    if labels.dtype.is_floating_point:
        if labels.shape != logits.shape:
            raise ConfigError(f"soft labels {tuple(labels.shape)} must have the logits' shape {tuple(logits.shape)}.")
        return -(labels * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ConfigError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)} (need [batch]).")
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T² · KL(softmax(z_T/T) ‖ softmax(z_S/T))``, averaged over the batch (the soft term of eq. 5).

    Computed in float32 from log-probabilities on both sides (no ``log(0)``), clamped at 0 per
    example so rounding can never make it negative. The teacher side is detached.
    """
    temperature = check_temperature("temperature", temperature)
    check_logit_shapes(student_logits, teacher_logits)
    log_p_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).clamp_min(0.0)
    return kl.mean() * temperature**2


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 4.0,
    task_weight: float = 0.5,
    kd_weight: float = 0.5,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """The survey's equation 5: ``λ1 · CE(y, z_S) + λ2 · T² · KL(p_T ‖ p_S)``.

    Args:
        student_logits, teacher_logits: ``[B, C]``.
        labels: hard ``int [B]`` or soft ``float [B, C]`` labels; ``None`` drops the task term
            (pure distillation, e.g. on unlabeled data).
        temperature: ``T > 0``.
        task_weight: ``λ1`` in ``[0, 1]``.
        kd_weight: ``λ2`` in ``[0, 1]``.
        label_smoothing: for hard labels.

    Returns:
        ``{"loss": total, "task": CE, "kd": T²·KL}`` (unweighted parts, for logging).

    Raises:
        ConfigError: ``T <= 0``, a weight outside ``[0, 1]``, or mismatched shapes.
    """
    task_weight = check_weight("task_weight", task_weight)
    kd_weight = check_weight("kd_weight", kd_weight)
    kd = kd_loss(student_logits, teacher_logits, temperature)
    task = task_loss(student_logits, labels, label_smoothing) if labels is not None else kd.new_zeros(())
    return {"loss": task_weight * task + kd_weight * kd, "task": task, "kd": kd}


# ----------------------------------------------------------------------------- feature losses
def _channels_last(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]`` so every feature loss works on ``[B, N, D]``."""
    return x.flatten(2).transpose(1, 2) if x.ndim == 4 else x


def _check_features(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ConfigError(
            f"{what}: student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} differ in "
            "batch/positions; map layers of the same resolution (or sequence length)."
        )
    if student.shape[-1] != teacher.shape[-1]:
        raise ConfigError(
            f"{what}: student width {student.shape[-1]} != teacher width {teacher.shape[-1]} and no projection given; "
            "use make_projection() (the Distillation callback does this for you)."
        )


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values [B, N]`` over positions where ``mask [B, N]`` is true (all when ``None``)."""
    if mask is None or values.ndim != 2 or mask.shape != values.shape:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _prepare(student: Tensor, teacher: Tensor, projection: nn.Module | None) -> tuple[Tensor, Tensor]:
    if projection is not None:
        student = projection(student)
    return _channels_last(student).float(), _channels_last(teacher.detach()).float()


def hidden_mse_loss(student: Tensor, teacher: Tensor, projection: nn.Module | None = None,
                    mask: Tensor | None = None) -> Tensor:
    """Mean squared error between (projected) student and teacher hidden states.

    Args:
        student, teacher: ``[B, N, D]`` token states, ``[B, D]`` vectors or ``[B, C, H, W]`` maps.
        projection: maps the student's width to the teacher's (see :func:`make_projection`).
        mask: ``[B, N]`` valid positions (padding excluded), e.g. the attention mask.
    """
    s, t = _prepare(student, teacher, projection)
    _check_features(s, t, "hidden-state MSE")
    return _masked_mean((s - t).pow(2).mean(-1), mask if s.ndim == 3 else None)


def hidden_cosine_loss(student: Tensor, teacher: Tensor, projection: nn.Module | None = None,
                       mask: Tensor | None = None) -> Tensor:
    """DistilBERT's cosine embedding loss with target 1: ``mean(1 - cos(h_S, h_T))`` over valid positions."""
    s, t = _prepare(student, teacher, projection)
    _check_features(s, t, "hidden-state cosine")
    return _masked_mean(1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8), mask if s.ndim == 3 else None)


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis' spatial attention ``Q = mean_c |F_c|^p``, flattened and L2-normalised: ``[B, H*W]``."""
    if features.ndim != 4:
        raise ConfigError(f"attention transfer needs conv feature maps [B, C, H, W]; got {tuple(features.shape)}.")
    q = features.float().abs().pow(p).mean(1).flatten(1)
    return F.normalize(q, dim=1)


def attention_transfer_loss(student: Tensor, teacher: Tensor, projection: nn.Module | None = None,
                            mask: Tensor | None = None, p: float = 2.0) -> Tensor:
    """``mean_b ‖Q_S/‖Q_S‖ − Q_T/‖Q_T‖‖₂``; channel counts may differ (maps are channel means), and
    a spatial-size mismatch is resolved by average-pooling the larger map to the smaller."""
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[0] != teacher.shape[0]:
        raise ConfigError(
            f"attention transfer: student {tuple(student.shape)} / teacher {tuple(teacher.shape)} must be "
            "[B, C, H, W] with the same batch size."
        )
    hs, ht = student.shape[-2:], teacher.shape[-2:]
    if hs != ht:
        size = (min(hs[0], ht[0]), min(hs[1], ht[1]))
        student = F.adaptive_avg_pool2d(student, size) if hs != size else student
        teacher = F.adaptive_avg_pool2d(teacher, size) if ht != size else teacher
    return (attention_map(student, p) - attention_map(teacher.detach(), p)).norm(dim=1).mean()


def attention_kl_loss(student: Tensor, teacher: Tensor, projection: nn.Module | None = None,
                      mask: Tensor | None = None) -> Tensor:
    """KL(teacher ‖ student) between attention distributions ``[B, heads, L, L]`` per query position.

    When the head counts differ, both are averaged over heads first. ``mask [B, L]`` restricts the
    average to real (non-padding) query positions.
    """
    if student.ndim != 4 or teacher.ndim != 4 or student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise ConfigError(
            f"attention KL: student attention {tuple(student.shape)} and teacher {tuple(teacher.shape)} must be "
            "[B, heads, L, L] with equal batch and length."
        )
    s, t = student.float(), teacher.detach().float()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    eps = 1e-12
    kl = (t * (t.clamp_min(eps).log() - s.clamp_min(eps).log())).sum(-1).clamp_min(0.0)  # [B, H, L]
    kl = kl.mean(1)  # [B, L]
    return _masked_mean(kl, mask)


FEATURE_LOSSES = {
    "mse": hidden_mse_loss,
    "cosine": hidden_cosine_loss,
    "attention_transfer": attention_transfer_loss,
    "attention_kl": attention_kl_loss,
}


def make_projection(student: Tensor, teacher: Tensor, kind: str) -> nn.Module | None:
    """A learned map from the student's feature width to the teacher's, or ``None`` when not needed.

    ``[B, C, H, W]`` features get a 1x1 convolution, others a linear layer on the last dimension.
    Only the MSE and cosine losses compare features channel by channel, so only they need one.
    """
    if kind not in ("mse", "cosine"):
        return None
    cs = student.shape[1] if student.ndim == 4 else student.shape[-1]
    ct = teacher.shape[1] if teacher.ndim == 4 else teacher.shape[-1]
    if cs == ct:
        return None
    if student.ndim == 4:
        return nn.Conv2d(cs, ct, kernel_size=1, bias=False)
    return nn.Linear(cs, ct)
