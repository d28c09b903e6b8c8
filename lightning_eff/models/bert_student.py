"""DistilBERT-style students (Sanh et al., 2019, arXiv:1910.01108; survey §3.2.1).

A student is a ``BertConfig`` copy of its teacher with fewer encoder layers (and optionally a
smaller width). When the widths match it starts from the teacher's weights: embeddings, pooler,
classifier, and a subset of the encoder layers spread over the teacher's depth —
:func:`student_layer_map` picks ``round(i * (n - 1) / (k - 1))``, which for 12 -> 6 layers is
DistilBERT's own choice ``[0, 2, 4, 7, 9, 11]`` ("taking one layer out of two"). It shares the
teacher's tokenizer (same ``vocab_size``: the datamodule's WordPiece vocabulary).

Example:
    >>> from lightning_eff.models import create_model
    >>> teacher = create_model("bert_teacher", num_classes=3, vocab_size=50, size="tiny", num_layers=4)
    >>> student = student_from_teacher(teacher, num_layers=2)
    >>> student.config.num_hidden_layers, student_layer_map(4, 2)
    (2, [0, 3])
"""
from __future__ import annotations

import copy
import logging
import os

from torch import nn

from lightning_eff.errors import ConfigError
from lightning_eff.models.baselines import BertClassifier
from lightning_eff.models.registry import register_model
from lightning_eff.validation import check_int

__all__ = ["student_layer_map", "student_from_teacher", "bert_student"]

log = logging.getLogger(__name__)


def student_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer index for each student layer: evenly spread, always the first and the last."""
    check_int("teacher_layers", teacher_layers, low=1)
    check_int("num_layers", student_layers, low=1, high=teacher_layers)
    if student_layers == 1:
        return [teacher_layers - 1]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


def _bert_of(model: nn.Module):
    """The ``BertForSequenceClassification`` inside a :class:`BertClassifier` (or the model itself)."""
    inner = model.bert if isinstance(model, BertClassifier) else model
    if not hasattr(inner, "bert") or not hasattr(inner, "classifier") or not hasattr(inner, "config"):
        raise ConfigError(f"teacher {type(model).__name__} is not a BERT sequence classifier; a BERT student needs one.")
    return inner


def student_from_teacher(teacher: nn.Module, num_layers: int, hidden: int | None = None, heads: int | None = None,
                         layers: list[int] | None = None, dropout: float | None = None) -> BertClassifier:
    """A :class:`BertClassifier` with ``num_layers`` encoder layers, initialised from ``teacher`` when shapes allow.

    Args:
        teacher: a :class:`BertClassifier` or a Hugging Face ``BertForSequenceClassification``.
        num_layers: student depth (``<=`` the teacher's).
        hidden, heads: a different width (the student then starts from random weights: shapes differ).
        layers: explicit teacher layer per student layer (default :func:`student_layer_map`).
        dropout: hidden/attention dropout (default the teacher's).

    Raises:
        ConfigError: ``num_layers`` above the teacher's depth, or a bad explicit ``layers`` list.
    """
    source = _bert_of(teacher)
    cfg = source.config
    check_int("num_layers", num_layers, low=1, high=cfg.num_hidden_layers)
    layers = list(layers) if layers is not None else student_layer_map(cfg.num_hidden_layers, num_layers)
    if len(layers) != num_layers or any(not 0 <= i < cfg.num_hidden_layers for i in layers):
        raise ConfigError(f"layers={layers} must list {num_layers} teacher layer indices in [0, {cfg.num_hidden_layers}).")
    width = hidden or cfg.hidden_size
    student = BertClassifier(
        num_classes=cfg.num_labels, vocab_size=cfg.vocab_size, max_length=cfg.max_position_embeddings,
        dropout=cfg.hidden_dropout_prob if dropout is None else dropout, num_layers=num_layers, hidden=width,
        heads=heads or (cfg.num_attention_heads if width == cfg.hidden_size else None) or max(1, width // 64),
        attn_implementation=getattr(cfg, "_attn_implementation", None) or "sdpa",
    )
    if width != cfg.hidden_size or student.config.intermediate_size != cfg.intermediate_size:
        log.warning("BERT student width %d != teacher width %d: initialised randomly (shapes differ).", width, cfg.hidden_size)
        return student
    target = student.bert
    target.bert.embeddings.load_state_dict(source.bert.embeddings.state_dict())
    for k, i in enumerate(layers):
        target.bert.encoder.layer[k].load_state_dict(source.bert.encoder.layer[i].state_dict())
    if getattr(source.bert, "pooler", None) is not None and target.bert.pooler is not None:
        target.bert.pooler.load_state_dict(source.bert.pooler.state_dict())
    target.classifier.load_state_dict(source.classifier.state_dict())
    student.init_layers = layers
    return student


@register_model("bert_student")
def bert_student(num_classes: int = 26, vocab_size: int = 8000, num_layers: int = 2, hidden: int = 256,
                 heads: int = 4, max_length: int = 128, dropout: float = 0.1, init_from: str | None = None,
                 attn_implementation: str = "sdpa") -> BertClassifier:
    """A small BERT; with ``init_from`` (teacher ``.ckpt``, HF model folder or state-dict file of a
    ``bert_teacher``) it copies the teacher's shape and weights DistilBERT-style, keeping ``num_layers``.

    Args:
        num_classes, vocab_size, max_length, dropout, attn_implementation: as for ``bert_teacher``.
        num_layers: encoder layers.
        hidden, heads: width and heads when built from scratch (ignored with ``init_from``: the teacher's).
        init_from: path of a trained teacher to initialise from.
    """
    if init_from is None:
        return BertClassifier(num_classes, vocab_size, "tiny", max_length, dropout, num_layers, hidden, heads,
                              attn_implementation)
    from lightning_eff.models.loading import load_model

    if not os.path.exists(os.path.expanduser(str(init_from))):
        raise ConfigError(f"model.init_from={init_from!r} does not exist; give a trained bert_teacher .ckpt or HF folder.")
    teacher = load_model(os.path.expanduser(str(init_from)), option="init_from")
    student = student_from_teacher(copy.deepcopy(teacher), num_layers, dropout=dropout)
    if student.config.num_labels != num_classes:
        raise ConfigError(f"model.init_from teacher has {student.config.num_labels} classes, the data has {num_classes}.")
    return student
