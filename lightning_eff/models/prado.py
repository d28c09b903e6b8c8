"""PRADO: ternary hash projection -> n-gram convolutions -> attention pooling -> classifier.

PRADO (Kaliamoorthi, Ravi & Kozareva, "PRADO: Projection Attention Networks for Document
Classification On-Device", EMNLP 2019; survey §3.4.2) builds on the same parameter-free
projection as pQRNN (:mod:`~lightning_eff.models.projection`), then, for each n-gram width
``n`` in ``ngrams``, computes with width-``n`` convolutions over the bottleneck features

    V_n = W_v * X          (values: what an n-gram says)
    A_n = W_a * X          (attention logits: how much it matters, per channel)
    e_n = sum_t softmax_t(A_n)[t] ⊙ V_n[t]     (softmax over the valid positions only)

and classifies the concatenation ``[e_1, ..., e_N]``. There is no recurrence: the whole model is
a handful of matrix products, which is why PRADO is the smallest and fastest of the family.

As in :mod:`~lightning_eff.models.pqrnn`, each convolution is an ``nn.Linear`` over stacked
neighbours so dynamic int8 quantization covers every weight, and ``model.encoder``
(:meth:`forward_features`) is the tensor-only, exportable part. The masked steps
(:func:`ngram_attention`, ``zero_padding``) are ``torch.fx.wrap``-ped, so FX static PTQ and QAT
trace the encoder with every Linear int8 and the masked softmax as one float call.

Example:
    >>> from lightning_eff.models import create_model
    >>> net = create_model("prado_tiny", num_classes=26)
    >>> net(["a hand tool for driving nails"]).shape
    torch.Size([1, 26])
"""
# No ``from __future__ import annotations``: FX copies the encoder's annotations into the code of
# traced / int8 graphs, and a string annotation becomes ``_Tensor_``, which TorchScript rejects.

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_eff.errors import ConfigError
from lightning_eff.models.pqrnn import ProjectionModel, causal_windows, zero_padding
from lightning_eff.models.projection import TernaryProjection
from lightning_eff.models.registry import register_model
from lightning_eff.validation import check_int, check_number

__all__ = ["NGramAttention", "PradoEncoder", "PRADO", "attention_pool", "ngram_attention"]


def attention_pool(values: Tensor, logits: Tensor, mask: Tensor) -> Tensor:
    """``sum_t softmax_t(logits)[t] * values[t]`` over valid positions (per channel); empty rows give 0."""
    logits = logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    weights = torch.softmax(logits, dim=1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a row with no valid token: all -inf -> NaN -> 0
    return (weights * values).sum(1)


def ngram_attention(projected: Tensor, mask: Tensor) -> Tensor:
    """Split a branch's projection ``[B, L, 2c]`` into values and logits, ``tanh`` the values, attention-pool."""
    values, logits = projected.chunk(2, dim=-1)
    return attention_pool(torch.tanh(values), logits, mask)


# Opaque to FX quantization: the masked softmax (bool mask) and tanh stay float (int8 tanh's fixed
# 1/128 grid cost 4 dB of logit SQNR on a WordNet-trained prado_tiny); see pqrnn.py.
torch.fx.wrap("ngram_attention")
torch.fx.wrap("zero_padding")


class NGramAttention(nn.Module):
    """One n-gram branch: width-``n`` convolutions for values and attention logits, then attention pooling."""

    def __init__(self, in_features: int, channels: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.proj = nn.Linear(width * in_features, 2 * channels)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        return ngram_attention(self.proj(causal_windows(x, self.width)), mask)


class PradoEncoder(nn.Module):
    """The tensor-only part of PRADO: ``(features [B,L,F], mask [B,L]) -> logits [B, C]``."""

    def __init__(self, in_features: int, num_classes: int, bottleneck: int, channels: int,
                 ngrams: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.bottleneck = nn.Linear(in_features, bottleneck)
        self.branches = nn.ModuleList([NGramAttention(bottleneck, channels, n) for n in ngrams])
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels * len(ngrams), num_classes)

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        x = zero_padding(torch.relu(self.bottleneck(features)), mask)
        pooled = [branch(x, mask) for branch in self.branches]
        return self.classifier(self.dropout(torch.cat(pooled, dim=-1)))


class PRADO(ProjectionModel):
    """PRADO text classifier on raw text (see the module docstring).

    Args:
        num_classes: classifier outputs.
        num_hashes, hash_bits, seed, char_ngrams, max_tokens: projection options.
        bottleneck: width of the dense layer after the projection.
        channels: output channels of each n-gram branch.
        ngrams: n-gram widths, e.g. ``[1, 2, 3]``.
        dropout: dropout before the classifier.

    Raises:
        ConfigError: an option out of range (e.g. an empty ``ngrams`` or a width < 1).
    """

    def __init__(self, num_classes: int = 26, num_hashes: int = 8, hash_bits: int = 128, seed: int = 0,
                 char_ngrams: int = 0, max_tokens: int = 64, bottleneck: int = 128, channels: int = 96,
                 ngrams: Sequence[int] = (1, 2, 3), dropout: float = 0.1) -> None:
        super().__init__()
        check_int("model.num_classes", num_classes, low=2)
        check_int("model.bottleneck", bottleneck, low=1)
        check_int("model.channels", channels, low=1)
        check_number("model.dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        if isinstance(ngrams, (str, bytes)) or not isinstance(ngrams, Sequence) or not len(ngrams):
            raise ConfigError(f"model.ngrams={ngrams!r} must be a non-empty list of n-gram widths, e.g. [1, 2, 3].")
        ngrams = [check_int("model.ngrams[]", n, low=1, high=16) for n in ngrams]
        self.projection = TernaryProjection(num_hashes, hash_bits, seed, char_ngrams, max_tokens)
        self.encoder = PradoEncoder(self.projection.out_features, num_classes, bottleneck, channels, ngrams, dropout)


@register_model("prado")
def prado(num_classes: int = 26, num_hashes: int = 8, hash_bits: int = 128, seed: int = 0, char_ngrams: int = 0,
          max_tokens: int = 64, bottleneck: int = 128, channels: int = 96, ngrams: Sequence[int] = (1, 2, 3),
          dropout: float = 0.1) -> PRADO:
    """PRADO on raw text: 512 ternary features, bottleneck 128, 1/2/3-gram branches of 96 channels (~0.2M params)."""
    return PRADO(num_classes, num_hashes, hash_bits, seed, char_ngrams, max_tokens, bottleneck, channels,
                 list(ngrams), dropout)


@register_model("prado_tiny")
def prado_tiny(num_classes: int = 26, seed: int = 0) -> PRADO:
    """A tiny PRADO for tests: 64 features, bottleneck 16, 1- and 2-gram branches of 8 channels."""
    return PRADO(num_classes, num_hashes=2, hash_bits=64, seed=seed, bottleneck=16, channels=8, ngrams=[1, 2], dropout=0.0)
