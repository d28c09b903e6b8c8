"""WordNet supersense classification (gloss -> lexicographer file) from the Debian package ``wordnet-base``.

Every synset line of ``data.noun`` / ``data.verb`` (WordNet 3.0 ``wndb(5)`` format) holds the
lexicographer file number (field 1) and a gloss after ``" | "``. The task, in the spirit of
supersense tagging (Ciaramita & Johnson, 2003), is to predict that file (``noun.artifact``,
``noun.person``, ...) from the gloss: 26 noun classes, 15 more with verbs.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_eff.errors import ConfigError, DataNotFoundError, did_you_mean
from lightning_eff.validation import check_bool

from .common import (
    TextClassificationDataModule,
    check_fractions,
    check_path,
    fraction_split,
    resolve_root,
)

__all__ = ["WordNetSupersenseDataModule", "LEXNAMES", "parse_wordnet_data", "DEFAULT_WORDNET_ROOT"]

DEFAULT_WORDNET_ROOT = "/usr/share/wordnet/"
# The standard lexicographer file list, lexnames(5WN): index = file number in data.* field 1.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
]
POS_CHOICES = ("noun", "verb")  # canonical order: class indices do not depend on the order given
_SS_TYPE = {"noun": ("n",), "verb": ("v",)}


def parse_wordnet_data(path: str | os.PathLike, pos: str) -> list[tuple[int, int, list[str], str]]:
    """Parse one ``data.<pos>`` file into ``(offset, lexfile_number, lemmas, gloss)`` rows.

    Raises:
        DataNotFoundError: a line does not follow the ``wndb(5)`` layout (corrupt/foreign file).
    """
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.startswith("  "):  # license header lines start with two spaces
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            try:
                offset, lex, ss_type, w_cnt = int(fields[0]), int(fields[1]), fields[2], int(fields[3], 16)
                lemmas = [fields[4 + 2 * k].replace("_", " ") for k in range(w_cnt)]
            except (IndexError, ValueError) as exc:
                raise DataNotFoundError(
                    f"{path}:{lineno} is not a WordNet data line ({exc}). Reinstall with: "
                    "apt-get update && apt-get install --reinstall -y wordnet-base (or fix data.root)."
                ) from exc
            if ss_type not in _SS_TYPE[pos] or not 0 <= lex < len(LEXNAMES) or not LEXNAMES[lex].startswith(pos):
                raise DataNotFoundError(f"{path}:{lineno}: synset type {ss_type!r} / lexfile {lex} does not belong to data.{pos}.")
            rows.append((offset, lex, lemmas, gloss.strip() if sep else ""))
    return rows


@functools.lru_cache(maxsize=4)
def _cached_rows(path: str, pos: str, _mtime: int) -> tuple:
    return tuple(parse_wordnet_data(path, pos))


def _check_pos(value) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)) or not len(items):
        raise ConfigError(f"data.pos={value!r} must be a non-empty list drawn from {list(POS_CHOICES)}.")
    for p in items:
        if p not in POS_CHOICES:
            raise ConfigError(f"data.pos contains {p!r}; choose from {list(POS_CHOICES)}.{did_you_mean(p, POS_CHOICES)}")
    return [p for p in POS_CHOICES if p in items]


class WordNetSupersenseDataModule(TextClassificationDataModule):
    """Gloss -> supersense (WordNet lexicographer file) classification.

    Args:
        root: folder with ``data.noun`` (and ``data.verb``); default ``/usr/share/wordnet/``.
        pos: parts of speech, ``["noun"]`` (26 classes, ~82k synsets) and/or ``"verb"`` (+15 classes).
        tokenizer: ``"raw"``, ``"wordpiece"`` (trained on the train split) or a local HF tokenizer folder.
        vocab_size: WordPiece vocabulary size.
        max_length: tokens per example including ``[CLS]``/``[SEP]`` (longer ones are truncated).
        batch_size, eval_batch_size: train and val/test batch sizes (eval defaults to batch_size).
        val_fraction, test_fraction: seeded random split of all synsets.
        seed: split seed (same seed -> same indices in every process).
        include_lemmas: prefix the gloss with ``"lemma1, lemma2: "`` (easier: lemmas carry the sense).
        limit_train, limit_val, limit_test: deterministic subsets of that many examples.
        label_fraction: instead of ``limit_train``, keep this fraction (0, 1] of every class of the training
            split (label-efficiency runs); the rest forms the unlabeled pool.
        cache_dir: where trained WordPiece tokenizers are cached (default ``~/.cache/lightning_eff/tokenizers``).
        num_workers: DataLoader workers.
        bucket_by_length: training batches of similar token counts (word counts for ``"raw"``),
            shuffled per epoch (:class:`~lightning_eff.data.sampling.LengthBucketSampler`): less
            padding for BERT/LSTM/QRNN models. Val/test loaders are unaffected.
        train_transform: text augmentation of the training batches, applied to the raw strings before
            tokenization (so it works for ``"raw"`` and tokenizers alike): ``None``, a
            :class:`~lightning_eff.learning.augment.text.TextAugment`, a ``{_target_: ...TextAugment, ops: [...]}``
            node, a list of ops, or any ``list[str] -> list[str]``. Fitted on the training texts at setup;
            val/test, ``sample_inputs`` and the pseudo-label pool are never augmented; labels are untouched.

    Raises:
        ConfigError: an option is invalid (named ``data.<arg>``).
        DataNotFoundError: at :meth:`setup`, the WordNet files are missing.
    """

    def __init__(
        self,
        root: str | None = None,
        pos: Sequence[str] = ("noun",),
        tokenizer: str = "raw",
        vocab_size: int = 8000,
        max_length: int = 64,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        include_lemmas: bool = False,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        cache_dir: str | None = None,
        num_workers: int = 0,
        bucket_by_length: bool = False,
        label_fraction: float | None = None,
        train_transform: Any = None,
    ):
        super().__init__(
            tokenizer=tokenizer, vocab_size=vocab_size, max_length=max_length, batch_size=batch_size,
            eval_batch_size=eval_batch_size, seed=seed, limit_train=limit_train, limit_val=limit_val,
            limit_test=limit_test, cache_dir=cache_dir, num_workers=num_workers, bucket_by_length=bucket_by_length,
            label_fraction=label_fraction, train_transform=train_transform,
        )
        self.root = check_path("data.root", root, allow_none=True)
        self.pos = _check_pos(pos)
        self.val_fraction, self.test_fraction = check_fractions(val_fraction, test_fraction)
        self.include_lemmas = check_bool("data.include_lemmas", include_lemmas)
        self.save_hyperparameters(ignore=["train_transform"])  # an object (ops, fitted vocabulary), not a hyperparameter
        self._lex_ids = [i for i, name in enumerate(LEXNAMES) if name.split(".")[0] in self.pos]

    @property
    def class_names(self) -> list[str]:
        """Lexicographer file names of the chosen parts of speech (known without reading files)."""
        return [LEXNAMES[i] for i in self._lex_ids]

    def _read(self):
        files = [f"data.{p}" for p in self.pos]
        folder = resolve_root(self.root, DEFAULT_WORDNET_ROOT, files, dataset="WordNet", apt_package="wordnet-base")
        to_class = {lex: k for k, lex in enumerate(self._lex_ids)}
        texts, labels = [], []
        for p, name in zip(self.pos, files):
            path = folder / name
            for _, lex, lemmas, gloss in _cached_rows(str(Path(path).resolve()), p, path.stat().st_mtime_ns):
                texts.append(f"{', '.join(lemmas)}: {gloss}" if self.include_lemmas else gloss)
                labels.append(to_class[lex])
        train, val, test = fraction_split(len(texts), self.val_fraction, self.test_fraction, self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        splits = {k: ([texts[i] for i in idx], [labels[i] for i in idx]) for k, idx in self.split_indices.items()}
        return splits, self.class_names
