"""Text -> model inputs: the ``tokenizer`` option of the text datamodules and per-batch padding.

``tokenizer`` is one of:

- ``"raw"``: no tokenization; batches carry ``{"text": list[str]}`` (projection/hashing models).
- ``"wordpiece"``: a BERT-style WordPiece vocabulary (Wu et al., 2016, arXiv:1609.08144; Devlin
  et al., 2019) trained on the *training split only* (no test-set leakage), lowercase, with
  ``[PAD] [UNK] [CLS] [SEP] [MASK]``, wrapped as a ``transformers`` ``BertTokenizerFast`` so a
  teacher and a student share it and it saves with ``save_pretrained``. Cached on disk keyed by
  the settings and a digest of the training texts.
- a path to a local Hugging Face tokenizer or model folder (``AutoTokenizer``, offline).

Why our own vocabulary trainer: ``tokenizers``' ``WordPieceTrainer`` assigns ids to ``##``
pieces in hash-map order and breaks count ties by those ids, so two runs on the same texts give
different vocabularies (huggingface/tokenizers#1794). The loop below is the same BPE-style merge
procedure with ties broken by the token strings, so the vocabulary depends only on the texts.
Normalisation, pre-tokenization and encoding still use the Rust ``tokenizers`` pipeline.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_eff.errors import ConfigError, did_you_mean

__all__ = [
    "SPECIAL_TOKENS",
    "check_tokenizer_option",
    "train_wordpiece_vocab",
    "wordpiece_tokenizer",
    "load_tokenizer",
    "TextDataset",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_BUILTIN = ("raw", "wordpiece")
_CACHE_VERSION = 1  # bump when the trainer changes so stale caches are not reused


def check_tokenizer_option(name: str, value) -> str:
    """``value`` must be ``"raw"``, ``"wordpiece"`` or an existing local tokenizer/model folder."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} must be 'raw', 'wordpiece' or a local tokenizer folder.")
    if value in _BUILTIN:
        return value
    if Path(value).expanduser().is_dir():
        return str(Path(value).expanduser())
    raise ConfigError(
        f"{name}={value!r} is neither a built-in tokenizer {list(_BUILTIN)} nor an existing folder "
        f"holding a Hugging Face tokenizer.{did_you_mean(value, _BUILTIN)}"
    )


def _pipeline(lowercase: bool):
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.BertNormalizer(lowercase=lowercase), pre_tokenizers.BertPreTokenizer()


def train_wordpiece_vocab(texts: Sequence[str], vocab_size: int, *, lowercase: bool = True) -> list[str]:
    """Learn a WordPiece vocabulary (specials, alphabet, then merged pieces) deterministically.

    Words (BERT normalisation + pre-tokenization) start as characters, non-initial ones with the
    ``##`` prefix; the most frequent adjacent pair is merged until ``vocab_size`` is reached.
    Ties go to the lexicographically smallest pair, so the result depends only on ``texts``.
    The whole alphabet is always kept (no ``[UNK]`` for characters seen in training), so the
    vocabulary exceeds ``vocab_size`` only if the specials plus alphabet already do.
    """
    norm, pre = _pipeline(lowercase)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    ordered = sorted(counts)
    words = [[w[0]] + ["##" + c for c in w[1:]] for w in ordered]
    freqs = [counts[w] for w in ordered]
    vocab, seen = list(SPECIAL_TOKENS), set(SPECIAL_TOKENS)
    for tok in sorted({s for w in words for s in w}):  # the alphabet always fits: no [UNK] for seen chars
        if tok not in seen:
            vocab.append(tok)
            seen.add(tok)
    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_count[p] += f
            where[p].add(i)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg:  # stale heap entry: the count changed since it was pushed
            continue
        merged = a + b[2:] if b.startswith("##") else a + b
        changed = set()
        for i in where.pop((a, b)):
            w, f = words[i], freqs[i]
            for p in zip(w, w[1:]):
                pair_count[p] -= f
                changed.add(p)
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):
                pair_count[p] += f
                where[p].add(i)
                changed.add(p)
        for p in changed:
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_count[p], *p))
            else:
                pair_count.pop(p, None)
        if merged not in seen:
            vocab.append(merged)
            seen.add(merged)
    return vocab


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()


def wordpiece_tokenizer(texts: Sequence[str], vocab_size: int, max_length: int, cache_dir: str | None = None):
    """Train (or load from cache) a lowercase WordPiece ``BertTokenizerFast`` on ``texts``.

    The cache folder is ``cache_dir/<key>`` (default ``~/.cache/lightning_eff/tokenizers``) with
    ``key`` a hash of the settings and the texts; it is written to a temporary folder and renamed,
    so concurrent processes (DDP ranks) never read a half-written tokenizer.
    """
    from transformers import BertTokenizerFast

    settings = {"kind": "wordpiece", "version": _CACHE_VERSION, "vocab_size": vocab_size, "lowercase": True,
                "texts": _texts_digest(texts)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    base = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "lightning_eff" / "tokenizers"
    target = base / key
    if (target / "tokenizer.json").is_file():
        return BertTokenizerFast.from_pretrained(str(target), local_files_only=True, model_max_length=max_length)
    vocab = train_wordpiece_vocab(texts, vocab_size)
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=max_length)
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=base))
        tok.save_pretrained(str(tmp))
        (tmp / "lightning_eff_settings.json").write_text(json.dumps(settings, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # read-only cache location: the in-memory tokenizer is still correct
        warnings.warn(f"could not cache the WordPiece tokenizer under {base} ({exc}); set data.cache_dir to a writable folder.",
                      stacklevel=2)
    return tok


def load_tokenizer(spec: str, *, train_texts: Sequence[str], vocab_size: int, max_length: int, cache_dir: str | None):
    """Resolve the ``tokenizer`` option (see module docstring); ``None`` for ``"raw"``.

    Raises:
        ConfigError: a local tokenizer has no padding token and no end-of-sequence token to pad with.
    """
    if spec == "raw":
        return None
    if spec == "wordpiece":
        return wordpiece_tokenizer(train_texts, vocab_size, max_length, cache_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ConfigError(f"data.tokenizer={spec!r} has no pad token and no eos token to pad batches with.")
        tok.pad_token = tok.eos_token  # GPT-style tokenizers: padding is masked out anyway
    return tok


class TextDataset(Dataset):
    """Texts + labels; items are indices and :meth:`collate` builds the batch dict.

    With a tokenizer, all texts are encoded once up front (batched Rust call, truncated to
    ``max_length`` including special tokens), and a batch is padded to its longest member only.

    ``transform`` (training sets only): a ``list[str] -> list[str]`` text augmentation
    (:class:`~lightning_eff.learning.augment.text.TextAugment`) that :meth:`collate` applies to the raw
    strings of each batch; with a tokenizer the augmented strings are encoded again, with the same
    truncation and padding, so the batch has the same keys and dtypes. :meth:`inputs` (``sample_inputs``)
    never augments. Labels are gathered by index, so augmentation cannot reorder or change them.
    """

    def __init__(self, texts: list[str], labels: list[int], tokenizer=None, max_length: int = 64, transform=None):
        self.texts, self.labels_t = texts, torch.as_tensor(labels, dtype=torch.long)
        self.tokenizer, self.ids = tokenizer, None  # with a tokenizer: per-text token counts
        self.max_length, self.transform = max_length, transform
        if tokenizer is not None:
            enc = tokenizer(texts, truncation=True, max_length=max_length, return_attention_mask=False,
                            return_token_type_ids=False) if texts else {"input_ids": []}
            # one flat tensor + offsets instead of one small tensor per text (80k+ allocations)
            self.ids = [len(x) for x in enc["input_ids"]]
            self.flat = np.fromiter((t for x in enc["input_ids"] for t in x), dtype=np.int64, count=sum(self.ids))
            self.offsets = np.concatenate([[0], np.cumsum(self.ids)[:-1]]).tolist() if self.ids else []
            self.pad_id = int(tokenizer.pad_token_id)
            self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> int:
        return index

    def _pad(self, rows: Sequence[Sequence[int]]) -> dict:
        """Token id rows -> ``input_ids``/``attention_mask`` int64 ``[B, longest]`` on the tokenizer's padding side."""
        lengths = [len(r) for r in rows]
        longest = max(lengths)
        input_ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for row, (ids, n) in enumerate(zip(rows, lengths, strict=True)):
            span = slice(longest - n, longest) if self.left else slice(0, n)
            input_ids[row, span] = ids
            mask[row, span] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}

    def inputs(self, indices: Sequence[int]) -> dict:
        """The model-input part of a batch (no labels, never augmented)."""
        if self.ids is None:
            return {"text": [self.texts[i] for i in indices]}
        return self._pad([self.flat[self.offsets[i] : self.offsets[i] + self.ids[i]] for i in indices])

    def augmented_inputs(self, indices: Sequence[int]) -> dict:
        """Model inputs of the ``transform``-ed texts of ``indices`` (tokenized now, like the stored ones)."""
        texts = self.transform([self.texts[i] for i in indices])
        if len(texts) != len(indices):
            raise ConfigError(f"data.train_transform returned {len(texts)} texts for a batch of {len(indices)}; "
                              "it must map list[str] -> list[str] of the same length.")
        if self.ids is None:
            return {"text": list(texts)}
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, return_attention_mask=False,
                             return_token_type_ids=False)
        return self._pad(enc["input_ids"])

    def collate(self, indices: list[int]) -> dict:
        batch = self.inputs(indices) if self.transform is None else self.augmented_inputs(indices)
        batch["labels"] = self.labels_t[torch.as_tensor(indices, dtype=torch.long)]
        return batch
