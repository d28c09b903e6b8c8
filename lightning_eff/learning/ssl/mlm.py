"""Masked-language-model pretraining of a BERT classifier's encoder (Devlin et al., 2019; survey §3.2.3).

Self-supervised learning in the survey's sense: the labels come from the data itself. A fraction of
the tokens is hidden and the encoder learns to predict them from their context, on text that needs
no annotation; the pretrained encoder then fine-tunes on few labels (``hands_over: backbone``).

The functional core, usable in any training loop (no Lightning):

- :func:`mask_tokens` — BERT's corruption: select ``rate`` of the real, non-special tokens; of those,
  80% become ``[MASK]``, 10% a random non-special token, 10% stay unchanged. Labels are the original
  ids at the selected positions and ``-100`` (``F.cross_entropy``'s ``ignore_index``) elsewhere.
- :func:`build_mlm_head` — Hugging Face's ``BertOnlyMLMHead`` (dense + GELU + LayerNorm + decoder) with
  the decoder weight *tied* to the encoder's word embeddings, as in BERT: the output layer costs no
  ``vocab x hidden`` parameters of its own, and the input embeddings learn from the output side too.
- :func:`mlm_logits` — encoder + head; with ``positions`` only the selected tokens go through the
  ``hidden x vocab`` decoder (15% of the work of decoding every position).

Why the head is not part of the classifier: the pipeline hands the classifier (``BertClassifier``) to
fine-tuning, so its state dict must be exactly the fine-tuned model's; the head lives beside it
(``MLMTask.mlm_head``) and is dropped after pretraining, as BERT's is.

Example:
    >>> from lightning_eff.models import create_model
    >>> model = create_model("bert_student", num_classes=3, vocab_size=50, num_layers=1, hidden=16, heads=2)
    >>> head = build_mlm_head(model)
    >>> head.predictions.decoder.weight is bert_encoder(model).get_input_embeddings().weight
    True
    >>> ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0, 0]])
    >>> masked, labels = mask_tokens(ids, (ids != 0).long(), mask_token_id=4, vocab_size=50,
    ...                              special_ids=[0, 1, 2, 3, 4], generator=torch.Generator().manual_seed(0))
    >>> int((labels != -100).sum()) >= 1 and bool((labels[0, [0, 5, 6, 7]] == -100).all())
    True
    >>> mlm_logits(model, head, masked, (ids != 0).long(), positions=labels != -100).shape[-1]
    50
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_int, check_number

__all__ = ["IGNORE_INDEX", "mask_tokens", "bert_encoder", "build_mlm_head", "tie_mlm_head", "mlm_logits"]

#: Label of positions that are not predicted (``F.cross_entropy``'s default ``ignore_index``).
IGNORE_INDEX = -100


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int],
    rate: float = 0.15,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masked-language-model corruption of a batch of token ids.

    Maskable tokens are the real ones (``attention_mask == 1``) that are not special: ``special_ids``
    (pass the tokenizer's ``all_special_ids``: ``[PAD] [UNK] [CLS] [SEP] [MASK]``) and ``mask_token_id``
    are never selected. ``[UNK]`` is excluded too, as in Hugging Face's ``DataCollatorForLanguageModeling``:
    predicting "some unknown word" teaches nothing about words. Each maskable token is selected with
    probability ``rate``; a row with maskable tokens but none selected (short glosses: ``0.85**n``) gets its
    maskable token of the lowest draw selected, so no row is all ``-100`` (its loss term would be empty).
    Of the selected tokens, a fraction ``mask_prob`` becomes ``mask_token_id``, ``random_prob`` a uniformly
    drawn non-special id below ``vocab_size`` (it may equal the original), the rest stay unchanged: the
    model cannot tell which inputs are genuine, so it must keep a good representation of every token.

    Args:
        input_ids: ``int64 [B, T]`` token ids.
        attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (``None``: every token is real).
        mask_token_id: id of ``[MASK]``.
        vocab_size: ids are drawn from ``[0, vocab_size)`` minus the special ids (``len(tokenizer)``).
        special_ids: ids that are never selected nor drawn.
        rate: fraction of maskable tokens selected, in ``(0, 1)``.
        mask_prob, random_prob: split of the selected tokens (``mask_prob + random_prob <= 1``).
        generator: a ``torch.Generator`` for reproducible masks (validation); its device decides where the
            random numbers are drawn (then moved to ``input_ids``' device). ``None``: torch's global RNG.

    Returns:
        ``(masked_ids, labels)``: the corrupted ids (a new tensor) and ``int64 [B, T]`` labels, the original
        id at selected positions and :data:`IGNORE_INDEX` elsewhere.

    Raises:
        ConfigError: an option out of range, or no non-special id to draw random tokens from.
    """
    check_number("rate", rate, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    check_number("mask_prob", mask_prob, low=0.0, high=1.0)
    check_number("random_prob", random_prob, low=0.0, high=1.0)
    if mask_prob + random_prob > 1.0 + 1e-9:
        raise ConfigError(f"mask_prob={mask_prob} + random_prob={random_prob} must be <= 1 (the rest stays unchanged).")
    check_int("vocab_size", vocab_size, low=1)
    check_int("mask_token_id", mask_token_id, low=0, high=vocab_size - 1)
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}.")
    device = input_ids.device
    special = torch.tensor(sorted({int(i) for i in special_ids} | {int(mask_token_id)}), dtype=torch.long, device=device)
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special[special < vocab_size]] = False
    replacements = allowed.nonzero().squeeze(1)
    if replacements.numel() == 0:
        raise ConfigError(f"vocab_size={vocab_size} leaves no non-special token id to draw random replacements from.")

    maskable = ~torch.isin(input_ids, special)
    if attention_mask is not None:
        maskable &= attention_mask.to(device).bool()
    # every draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then moved
    draw_device = generator.device if generator is not None else device
    shape = tuple(input_ids.shape)
    select_u = torch.rand(shape, generator=generator, device=draw_device).to(device)
    kind_u = torch.rand(shape, generator=generator, device=draw_device).to(device)
    random_ix = torch.randint(0, replacements.numel(), shape, generator=generator, device=draw_device).to(device)

    selected = (select_u < rate) & maskable
    starved = maskable.any(dim=1) & ~selected.any(dim=1)
    if starved.any():  # the maskable token of the lowest draw: still uniformly random within the row
        first = select_u.masked_fill(~maskable, 2.0).argmin(dim=1)
        rows = starved.nonzero().squeeze(1)
        selected[rows, first[rows]] = True

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    to_mask = selected & (kind_u < mask_prob)
    to_random = selected & (kind_u >= mask_prob) & (kind_u < mask_prob + random_prob)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = replacements[random_ix[to_random]]
    return masked, labels


def bert_encoder(model: nn.Module) -> nn.Module:
    """The Hugging Face ``BertModel`` of a BERT classifier: ``model.bert.bert`` (a :class:`BertClassifier`)
    or ``model.bert`` (a ``BertForSequenceClassification``).

    Raises:
        ConfigError: ``model`` holds no ``BertModel`` there.
    """
    from transformers import BertModel

    owner = getattr(model, "bert", None)
    for candidate in (getattr(owner, "bert", None), owner):
        if isinstance(candidate, BertModel):
            return candidate
    raise ConfigError(
        f"model={type(model).__name__} is not supported for masked-language-model pretraining: give a BertClassifier "
        "(registry models bert_student, bert_teacher) or a module whose .bert.bert (or .bert) is a Hugging Face BertModel."
    )


def tie_mlm_head(head: nn.Module, encoder: nn.Module) -> nn.Module:
    """Tie ``head``'s decoder to ``encoder``'s word embeddings (one ``Parameter``, one storage); return ``head``.

    Why by hand: in ``transformers`` >= 5 tying is done by ``PreTrainedModel.tie_weights`` from the model's
    ``_tied_weights_keys`` (``cls.predictions.decoder.weight -> bert.embeddings.word_embeddings.weight`` and
    ``decoder.bias -> predictions.bias``); a bare ``BertOnlyMLMHead`` is no ``PreTrainedModel`` and is not
    tied. Both ties are done here: the decoder's own bias would otherwise shadow ``predictions.bias``, which
    would then be a parameter no gradient reaches (DDP refuses those unless ``find_unused_parameters``).
    Call it again after anything that replaces the embedding ``Parameter`` (resizing the vocabulary).
    """
    predictions = head.predictions
    predictions.decoder.weight = encoder.get_input_embeddings().weight
    predictions.decoder.bias = predictions.bias
    return head


def build_mlm_head(model: nn.Module) -> nn.Module:
    """A fresh ``BertOnlyMLMHead`` for ``model``'s encoder (its config), decoder tied to the word embeddings.

    Initialised as BERT initialises its own layers (normal(0, ``initializer_range``) weights, zero
    biases, LayerNorm 1/0): the head is not a ``PreTrainedModel``, so ``post_init`` never runs on it and
    its dense layer would otherwise keep PyTorch's (larger) Kaiming-uniform init.

    Raises:
        ConfigError: ``model`` is not a BERT classifier (see :func:`bert_encoder`).
    """
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    encoder = bert_encoder(model)
    config = encoder.config
    head = BertOnlyMLMHead(config)
    transform = head.predictions.transform
    nn.init.normal_(transform.dense.weight, mean=0.0, std=config.initializer_range)
    nn.init.zeros_(transform.dense.bias)
    nn.init.ones_(transform.LayerNorm.weight)
    nn.init.zeros_(transform.LayerNorm.bias)
    nn.init.zeros_(head.predictions.bias)
    weight = encoder.get_input_embeddings().weight
    return tie_mlm_head(head.to(device=weight.device, dtype=weight.dtype), encoder)


def mlm_logits(model: nn.Module, head: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
               positions: Tensor | None = None) -> Tensor:
    """Vocabulary logits of a BERT classifier's encoder through an MLM ``head``.

    Args:
        model: a :class:`BertClassifier` (or see :func:`bert_encoder`); its pooler and classifier are not used
            for the prediction (the pooler still runs inside ``BertModel``'s forward).
        head: from :func:`build_mlm_head`.
        input_ids, attention_mask: the (masked) batch.
        positions: optional ``bool [B, T]``; then only those tokens are decoded.

    Returns:
        ``[B, T, vocab]`` logits, or ``[N, vocab]`` for the ``N`` selected positions (row-major order,
        the order of ``labels[positions]``).
    """
    hidden = bert_encoder(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    if positions is not None:
        hidden = hidden[positions]
    return head(hidden)
