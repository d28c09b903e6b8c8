"""Baselines the efficient architectures are measured against.

- ``"lstm"``: a bidirectional LSTM over a *word embedding table* on raw text: the O(V·d)
  design that projection models (pQRNN/PRADO) replace with a parameter-free hash.
- ``"bert_teacher"`` / ``"bert_tiny"``: ``transformers`` ``BertForSequenceClassification`` from a
  ``BertConfig`` (random init, nothing downloaded) in the standard BERT sizes of Turc et al.
  ("Well-Read Students Learn Better", 2019): tiny 2x128, mini 4x256, small 4x512, medium 8x512,
  base 12x768. Takes WordPiece ``input_ids``/``attention_mask`` (``data.tokenizer=wordpiece``).
- ``"plain_cnn"``: MobileNetV2 with every depthwise 3x3 convolution replaced by a standard 3x3
  convolution of the same shape (see :mod:`~lightning_eff.models.conv_cost`), so the saving of
  depthwise-separable convolutions is measured inside the real architecture.

LSTM vocabulary (the choice, documented): the LSTM reads the same raw-text batches as pQRNN
(``data.tokenizer=raw``), lower-cased and split on non-alphanumerics exactly like the
projection. Its word vocabulary is built from the *training* texts: either up front with
:meth:`LSTMClassifier.fit_vocabulary` (most frequent words first, ties by spelling; used by the
benchmark), or, when the model is built from a config with no vocabulary, online: during
training each new word gets the next free row until ``vocab_size`` rows are used; in eval mode
unknown words map to ``[UNK]``. The vocabulary is saved in the ``state_dict`` (``_extra_state``,
plain strings: loads with ``weights_only=True``). With DDP the online vocabulary would differ
between ranks, so fit it first (or use one device).

Example:
    >>> from lightning_eff.models import create_model
    >>> net = create_model("lstm", num_classes=26, vocab_size=100, embed_dim=8, hidden=8)
    >>> net.fit_vocabulary(["a hand tool", "a small rodent"])
    >>> net(["a hand tool"]).shape
    torch.Size([1, 26])
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_eff.errors import ConfigError
from lightning_eff.models.pqrnn import POOLINGS, masked_pool
from lightning_eff.models.projection import tokenize
from lightning_eff.models.registry import register_model
from lightning_eff.validation import check_choice, check_int, check_number

__all__ = ["LSTMClassifier", "lstm", "BertClassifier", "bert_teacher", "bert_tiny", "BERT_SIZES"]

PAD, UNK = 0, 1  # reserved rows of the embedding table


class LSTMClassifier(nn.Module):
    """Word embedding table -> bidirectional LSTM -> masked pooling -> classifier, on raw text.

    Args:
        num_classes: classifier outputs.
        vocab_size: embedding rows for words (plus ``[PAD]`` and ``[UNK]``).
        embed_dim: embedding width (300 = the usual word-vector size).
        hidden: LSTM state size per direction.
        num_layers: stacked LSTM layers.
        dropout: dropout on embeddings and before the classifier.
        pooling: ``"mean"``, ``"max"`` or ``"mean_max"`` over valid positions.
        max_tokens: tokens kept per text.
        vocab: optional fixed word list (else fit or grown online, see the module docstring).

    Raises:
        ConfigError: an option out of range or not among the choices.
    """

    def __init__(self, num_classes: int = 26, vocab_size: int = 20000, embed_dim: int = 300, hidden: int = 256,
                 num_layers: int = 1, dropout: float = 0.1, pooling: str = "mean_max", max_tokens: int = 64,
                 vocab: Sequence[str] | None = None) -> None:
        super().__init__()
        check_int("model.num_classes", num_classes, low=2)
        self.vocab_size = check_int("model.vocab_size", vocab_size, low=1)
        check_int("model.embed_dim", embed_dim, low=1)
        check_int("model.hidden", hidden, low=1)
        check_int("model.num_layers", num_layers, low=1, high=8)
        check_number("model.dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        self.pooling = check_choice("model.pooling", pooling, POOLINGS)
        self.max_tokens = check_int("model.max_tokens", max_tokens, low=1)
        self.embedding = nn.Embedding(vocab_size + 2, embed_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=num_layers, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden * (2 if pooling == "mean_max" else 1), num_classes)
        self.words: dict[str, int] = {}
        self.frozen = False
        if vocab is not None:
            self.set_vocabulary(vocab)

    # ---------------------------------------------------------------------------- vocabulary
    def set_vocabulary(self, words: Iterable[str]) -> None:
        """Use ``words`` (in order, at most ``vocab_size``) as the fixed vocabulary."""
        words = list(dict.fromkeys(words))
        if len(words) > self.vocab_size:
            raise ConfigError(f"vocabulary of {len(words)} words exceeds model.vocab_size={self.vocab_size}.")
        self.words = {w: i + 2 for i, w in enumerate(words)}
        self.frozen = True

    def fit_vocabulary(self, texts: Iterable[str], min_count: int = 1) -> None:
        """Keep the ``vocab_size`` most frequent training words (ties broken by spelling: deterministic)."""
        check_int("min_count", min_count, low=1)
        counts = Counter(w for text in texts for w in tokenize(text, self.max_tokens))
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        self.set_vocabulary(ranked[: self.vocab_size])

    def get_extra_state(self) -> dict[str, Any]:  # noqa: D102  (saved in the state_dict)
        return {"words": sorted(self.words, key=self.words.__getitem__), "frozen": self.frozen}

    def set_extra_state(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.words = {w: i + 2 for i, w in enumerate(state["words"])}
        self.frozen = bool(state["frozen"])

    def encode(self, text: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Word ids ``[B, L]`` (0 = padding) and lengths ``[B]``; grows the vocabulary when training."""
        if isinstance(text, str) or not all(isinstance(t, str) for t in text):
            raise ConfigError(f"LSTM input must be a list of strings, got {type(text).__name__}.")
        grow = self.training and not self.frozen
        rows = []
        for t in text:
            ids = []
            for w in tokenize(t, self.max_tokens):
                i = self.words.get(w)
                if i is None and grow and len(self.words) < self.vocab_size:
                    i = self.words[w] = len(self.words) + 2
                ids.append(UNK if i is None else i)
            rows.append(ids)
        lengths = torch.tensor([max(1, len(r)) for r in rows], dtype=torch.long)
        ids = torch.zeros(len(rows), int(lengths.max()) if rows else 1, dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
            if not r:
                ids[k, 0] = UNK  # an empty text reads as one unknown word
        return ids, lengths

    # ---------------------------------------------------------------------------- forward
    def forward_ids(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """Tensor path: word ids ``[B, L]`` and lengths ``[B]`` -> logits."""
        x = self.dropout(self.embedding(ids))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.size(1))
        mask = torch.arange(ids.size(1), device=ids.device)[None] < lengths.to(ids.device)[:, None]
        return self.classifier(self.dropout(masked_pool(out, mask, self.pooling)))

    def forward(self, text: list[str]) -> Tensor:
        """Logits ``[B, num_classes]`` for a batch of raw strings."""
        ids, lengths = self.encode(text)
        return self.forward_ids(ids.to(self.embedding.weight.device), lengths)


@register_model("lstm")
def lstm(num_classes: int = 26, vocab_size: int = 20000, embed_dim: int = 300, hidden: int = 256, num_layers: int = 1,
         dropout: float = 0.1, pooling: str = "mean_max", max_tokens: int = 64) -> LSTMClassifier:
    """BiLSTM over a 20k-word embedding table of width 300 (~7.2M parameters, 6M of them the table)."""
    return LSTMClassifier(num_classes, vocab_size, embed_dim, hidden, num_layers, dropout, pooling, max_tokens)


# ------------------------------------------------------------------------------------ BERT
BERT_SIZES = {  # name -> (layers, hidden, heads); intermediate = 4 * hidden (Turc et al., 2019)
    "tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "medium": (8, 512, 8), "base": (12, 768, 12),
}


class BertClassifier(nn.Module):
    """``BertForSequenceClassification`` (random init) whose ``forward(input_ids, attention_mask)`` returns logits.

    Args:
        num_classes: classifier outputs.
        vocab_size: WordPiece vocabulary size (``len(datamodule.tokenizer)``).
        size: one of :data:`BERT_SIZES`.
        max_length: position embeddings (the longest input).
        dropout: hidden and attention dropout.
        num_layers, hidden, heads: override the size's depth, width and heads (intermediate = 4 * hidden).
        attn_implementation: ``"sdpa"`` (fast) or ``"eager"`` (also returns attention probabilities).
        pretrained: a local Hugging Face BERT folder (``config.json`` + weights) to start from instead of
            random weights; the size options are then the folder's, a new classifier head gets ``num_classes``
            outputs, and the data must use the folder's tokenizer (``data.tokenizer=<same folder>``).

    Raises:
        ConfigError: an unknown size or an option out of range; a ``pretrained`` folder that is missing or
            whose vocabulary differs from ``vocab_size``.
    """

    def __init__(self, num_classes: int = 26, vocab_size: int = 8000, size: str = "base", max_length: int = 128,
                 dropout: float = 0.1, num_layers: int | None = None, hidden: int | None = None,
                 heads: int | None = None, attn_implementation: str = "sdpa", pretrained: str | None = None) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        check_int("model.num_classes", num_classes, low=2)
        check_int("model.vocab_size", vocab_size, low=8)
        check_choice("model.size", size, list(BERT_SIZES))
        check_int("model.max_length", max_length, low=2)
        check_number("model.dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        check_choice("model.attn_implementation", attn_implementation, ["sdpa", "eager"])
        if pretrained is not None:
            self.bert = _from_pretrained(pretrained, num_classes, vocab_size, attn_implementation)
            self.config = self.bert.config
            return
        layers, width, n_heads = BERT_SIZES[size]
        layers = check_int("model.num_layers", num_layers, low=1, high=48, allow_none=True) or layers
        width = check_int("model.hidden", hidden, low=8, allow_none=True) or width
        n_heads = check_int("model.heads", heads, low=1, allow_none=True) or n_heads
        if width % n_heads:
            raise ConfigError(f"model.hidden={width} must be divisible by model.heads={n_heads}.")
        self.config = BertConfig(
            vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=n_heads,
            intermediate_size=4 * width, max_position_embeddings=max_length, num_labels=num_classes,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            attn_implementation=attn_implementation,  # "eager" returns attention maps (attention_kl distillation)
        )
        self.bert = BertForSequenceClassification(self.config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:  # noqa: D102
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


def _from_pretrained(path: str, num_classes: int, vocab_size: int, attn_implementation: str) -> nn.Module:
    """A local Hugging Face BERT checkpoint with a ``num_classes`` head (offline: nothing is downloaded)."""
    import os

    from transformers import BertForSequenceClassification

    folder = os.path.expanduser(str(path))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"model.pretrained={path!r} is not a Hugging Face model folder (no config.json).")
    model = BertForSequenceClassification.from_pretrained(
        folder, num_labels=num_classes, local_files_only=True, attn_implementation=attn_implementation,
        ignore_mismatched_sizes=True,  # a pretraining or other-task head is replaced by a fresh classifier
    )
    if model.config.vocab_size != vocab_size:
        raise ConfigError(
            f"model.pretrained={path!r} has a vocabulary of {model.config.vocab_size} but the data's tokenizer has "
            f"{vocab_size}; use the checkpoint's tokenizer: data.tokenizer={path}."
        )
    return model


@register_model("bert_teacher")
def bert_teacher(num_classes: int = 26, vocab_size: int = 8000, size: str = "base", max_length: int = 128,
                 dropout: float = 0.1, num_layers: int | None = None, hidden: int | None = None,
                 heads: int | None = None, attn_implementation: str = "sdpa", pretrained: str | None = None) -> BertClassifier:
    """BERT teacher (default BERT-base shape, 12x768) from a ``BertConfig``, random init, or from a local
    pretrained Hugging Face folder (``pretrained=``)."""
    return BertClassifier(num_classes, vocab_size, size, max_length, dropout, num_layers, hidden, heads,
                          attn_implementation, pretrained)


@register_model("bert_tiny")
def bert_tiny(num_classes: int = 26, vocab_size: int = 8000, max_length: int = 128) -> BertClassifier:
    """BERT-tiny (2 layers, hidden 128) for tests."""
    return BertClassifier(num_classes, vocab_size, "tiny", max_length, 0.0)


# ------------------------------------------------------------------------------- plain CNN
