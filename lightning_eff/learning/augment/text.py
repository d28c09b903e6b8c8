"""Text augmentation (survey §3.2.2): word dropout and swaps, SwitchOut, typos, WordNet synonyms.

The ops work on raw strings, before any tokenizer, so one ``data.train_transform`` serves projection
models (``tokenizer: raw``, which hash the characters themselves) and WordPiece / Hugging Face
tokenizers alike: the text datamodules augment the strings of each *training* batch and only then
tokenize them (validation, test, ``sample_inputs`` and the pseudo-label pool are never augmented).

- Words are the whitespace-separated tokens of a text; punctuation glued to a word (``"car,"``) is
  kept around it and the op edits the word inside. A text an op leaves unchanged is returned as
  given; a changed one is re-joined with single spaces.
- Every op is ``op(text, rng) -> str`` with ``rng`` a :class:`random.Random` (or the ``random``
  module itself). :class:`TextAugment` composes ops and owns the randomness: with ``seed=None`` it
  draws from Python's global ``random``, which ``seed_everything(workers=True)`` seeds in the main
  process and in every dataloader worker, so a run is reproducible under its seed and workers do not
  repeat each other; ``seed=<int>`` gives a private stream, for use outside a Trainer.
- Labels are untouched by construction (text in, text out): these are the *label-preserving*
  augmentations of the survey. Label-mixing (Mixup) has no text counterpart here.

References: word dropout / swap as in EDA (Wei & Zou, 2019, arXiv:1901.11196) and unsupervised NMT
noise (Lample et al., 2018); SwitchOut (Wang et al., 2018, arXiv:1808.07512); synonym replacement
from WordNet (Miller, 1995; Zhang et al., 2015); character noise as in Belinkov & Bisk (2018).

Example:
    >>> import random
    >>> WordSwap(p=1.0)("the quick brown fox", random.Random(0))
    'quick the fox brown'
    >>> aug = TextAugment([WordDropout(p=0.3), CharNoise(p=0.3)], seed=0)
    >>> aug(["a small domesticated carnivorous mammal", "an herb with yellow flowers"])
    ['a small domesticated mammal', 'an heb wipth flowers']
    >>> aug(["a small domesticated carnivorous mammal"]) != aug(["a small domesticated carnivorous mammal"])
    True
"""
from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_eff.data.transforms import TextAugment, TextOp, check_text_transform
from lightning_eff.errors import ConfigError, DataNotFoundError
from lightning_eff.validation import (
    as_list,
    check_choice,
    check_number,
)

__all__ = [
    "TextOp",
    "WordDropout",
    "WordSwap",
    "SwitchOut",
    "CharNoise",
    "SynonymReplace",
    "TextAugment",
    "check_text_transform",
    "wordnet_synonyms",
    "DEFAULT_WORDNET_ROOT",
    "CHAR_OPS",
    "WORDNET_POS",
]

DEFAULT_WORDNET_ROOT = "/usr/share/wordnet"
CHAR_OPS = ("insert", "delete", "substitute", "swap")
WORDNET_POS = ("noun", "verb", "adj", "adv")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# leading punctuation, the word, trailing punctuation: "(usually" -> "(", "usually", ""
_SPLIT = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
# Function words are never replaced by synonyms: WordNet lists "a" (vitamin A), "in" (inch, Indiana), "it"
# (information technology), "be" (beryllium), ... and swapping those in changes a gloss into nonsense.
_STOPWORDS = frozenset(
    "a an the in on at of to for by with from as or and but nor not no is are was were be been being am it its "
    "this that these those who whom whose which what he she they we you i me him her them us my his their our "
    "your do does did have has had will would can could may might must shall should so if then than there here "
    "up down out off into onto over under about after before all any some each every other such one only very "
    "also more most much many few".split()
)


def _keyboard_neighbours() -> dict[str, str]:
    """QWERTY neighbours (staggered rows): realistic substitution typos (Belinkov & Bisk's "Key" noise)."""
    rows = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
    out = {}
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            near = [row[c - 1]] if c > 0 else []
            near += [row[c + 1]] if c + 1 < len(row) else []
            for rr, cols in ((r - 1, (c, c + 1)), (r + 1, (c - 1, c))):  # the row above is shifted left
                if 0 <= rr < len(rows):
                    near += [rows[rr][k] for k in cols if 0 <= k < len(rows[rr])]
            out[ch] = "".join(near)
    return out


_NEIGHBOURS = _keyboard_neighbours()


def _check_p(p: Any) -> float:
    return float(check_number("p", p, low=0.0, high=1.0))


def _split(token: str) -> tuple[str, str, str]:
    lead, core, trail = _SPLIT.match(token).groups()
    return lead, core, trail


class WordDropout(TextOp):
    """Drop each word with probability ``p``; at least one (random) word is always kept.

    Why never empty: an empty string tokenizes to ``[CLS] [SEP]`` only, and a projection model's hash of
    nothing is all-zero: a training example with no input at all but still a label.

    Args:
        p: drop probability per word, in ``[0, 1]``.
    """

    _fields = ("p",)

    def __init__(self, p: float = 0.1):
        self.p = _check_p(p)

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        if self.p == 0.0 or not words:
            return text
        kept = [w for w in words if rng.random() >= self.p]
        if not kept:
            kept = [words[rng.randrange(len(words))]]
        return text if len(kept) == len(words) else " ".join(kept)


class WordSwap(TextOp):
    """Swap adjacent words: scanning left to right, each position swaps with the next one with probability ``p``.

    A swapped pair is skipped over, so swaps do not overlap (``p=1`` swaps every pair: ``a b c d -> b a d c``)
    and a word moves at most one place: local order noise, as in Lample et al. (2018).

    Args:
        p: swap probability per position, in ``[0, 1]``.
    """

    _fields = ("p",)

    def __init__(self, p: float = 0.1):
        self.p = _check_p(p)

    def __call__(self, text: str, rng: random.Random) -> str:
        words = text.split()
        if self.p == 0.0 or len(words) < 2:
            return text
        i, changed = 0, False
        while i < len(words) - 1:
            if rng.random() < self.p:
                words[i], words[i + 1] = words[i + 1], words[i]
                changed, i = True, i + 2
            else:
                i += 1
        return " ".join(words) if changed else text


class SwitchOut(TextOp):
    """SwitchOut (Wang et al., 2018, arXiv:1808.07512): replace ``n ~ P(n) ∝ exp(-n / tau)`` random words.

    ``n`` ranges over ``0..len(words)``; the ``n`` positions are drawn without replacement and each word is
    replaced by one drawn uniformly from the vocabulary *other than itself* (the paper's ``V \\ {s_i}``), so
    exactly ``n`` words change. Small ``tau`` keeps most texts intact; large ``tau`` approaches a uniform ``n``.

    Args:
        tau: temperature, ``> 0``.
        vocab: the replacement words; ``None`` uses the words of the texts given to :meth:`fit` (the text
            datamodules fit it on the training split), or, never fitted, the words of the current text.
    """

    _fields = ("tau",)

    def __init__(self, tau: float = 1.0, vocab: Sequence[str] | None = None):
        self.tau = float(check_number("tau", tau, low=0.0, low_inclusive=False))
        if vocab is not None:
            words = as_list("vocab", vocab, item=str, allow_empty=False)
            vocab = list(dict.fromkeys(w for w in words if w.strip()))  # duplicates would bias the uniform draw
            if not vocab:
                raise ConfigError(f"vocab={words[:5]!r} holds no non-blank word.")
        self.vocab: list[str] | None = vocab
        self._fixed = vocab is not None

    def fit(self, texts: Iterable[str]) -> SwitchOut:
        """Use the distinct words of ``texts`` (punctuation stripped, sorted) as the vocabulary.

        A ``vocab`` given to the constructor wins: fitting then changes nothing.
        """
        if not self._fixed:
            words = {_split(t)[1] for text in texts for t in text.split()}
            words.discard("")
            self.vocab = sorted(words)  # sorted: the same draws in every process (set order is hash-seeded)
        return self

    def _sample_n(self, length: int, rng: random.Random) -> int:
        weights = [math.exp(-n / self.tau) for n in range(length + 1)]
        return rng.choices(range(length + 1), weights=weights)[0]

    def __call__(self, text: str, rng: random.Random) -> str:
        tokens = text.split()
        slots = [i for i, t in enumerate(tokens) if _split(t)[1]]
        if not slots:
            return text
        n = self._sample_n(len(slots), rng)
        if n == 0:
            return text
        vocab = self.vocab if self.vocab else sorted({_split(tokens[i])[1] for i in slots})
        changed = False
        for i in rng.sample(slots, n):
            lead, core, trail = _split(tokens[i])
            if len(vocab) == 1 and vocab[0] == core:
                continue  # nothing else to draw
            new = core
            while new == core:  # rejection: P(hit itself) <= 1/2 unless vocab has 1 word (excluded above)
                new = vocab[rng.randrange(len(vocab))]
            tokens[i], changed = lead + new + trail, True
        return " ".join(tokens) if changed else text


class CharNoise(TextOp):
    """Typos: each alphabetic word, with probability ``p``, gets one character edit of a random kind.

    Kinds: ``insert`` (a random letter), ``delete`` (words of 2+ letters), ``substitute`` (a QWERTY neighbour
    of the letter with ``keyboard=True``, else any other letter; the letter's case is kept) and ``swap``
    (two adjacent *different* letters). Each edit is exactly one Damerau-Levenshtein operation; a kind that
    cannot apply to a word (``delete`` on ``"a"``) is not drawn for it. Words with digits or inner
    punctuation (``"don't"``, ``"3rd"``) are left alone.

    Args:
        p: probability per word, in ``[0, 1]``.
        ops: the kinds to draw from, a non-empty subset of ``("insert", "delete", "substitute", "swap")``.
        keyboard: substitutions by keyboard neighbours (realistic typos) instead of uniform letters.
    """

    _fields = ("p", "ops", "keyboard")

    def __init__(self, p: float = 0.1, ops: Sequence[str] = CHAR_OPS, keyboard: bool = True):
        self.p = _check_p(p)
        kinds = as_list("ops", ops, item=str, allow_empty=False)
        for k in kinds:
            check_choice("ops", k, CHAR_OPS)
        self.ops = tuple(dict.fromkeys(kinds))
        if not isinstance(keyboard, bool):
            raise ConfigError(f"keyboard={keyboard!r} must be true or false.")
        self.keyboard = keyboard

    def _edit(self, w: str, rng: random.Random) -> str:
        swaps = [i for i in range(len(w) - 1) if w[i] != w[i + 1]]
        kinds = [k for k in self.ops if (k != "delete" or len(w) > 1) and (k != "swap" or swaps)]
        if not kinds:
            return w
        kind = kinds[rng.randrange(len(kinds))]
        if kind == "swap":
            i = swaps[rng.randrange(len(swaps))]
            return w[:i] + w[i + 1] + w[i] + w[i + 2 :]
        i = rng.randrange(len(w) + (kind == "insert"))
        if kind == "delete":
            return w[:i] + w[i + 1 :]
        if kind == "insert":
            c = _LETTERS[rng.randrange(26)]
            return w[:i] + (c.upper() if w.isupper() else c) + w[i:]
        old = w[i].lower()
        pool = _NEIGHBOURS.get(old, "") if self.keyboard else ""
        pool = pool or _LETTERS.replace(old, "")  # non-ASCII letters: any a-z letter
        c = pool[rng.randrange(len(pool))]
        return w[:i] + (c.upper() if w[i].isupper() else c) + w[i + 1 :]

    def __call__(self, text: str, rng: random.Random) -> str:
        tokens = text.split()
        if self.p == 0.0 or not tokens:
            return text
        changed = False
        for j, t in enumerate(tokens):
            lead, core, trail = _split(t)
            if core.isalpha() and rng.random() < self.p:
                new = self._edit(core, rng)
                if new != core:
                    tokens[j], changed = lead + new + trail, True
        return " ".join(tokens) if changed else text


def _wordnet_files(root: str | Path, pos: Sequence[str]) -> list[Path]:
    return [Path(root).expanduser() / f"data.{p}" for p in pos]


@functools.lru_cache(maxsize=4)
def wordnet_synonyms(root: str = DEFAULT_WORDNET_ROOT, pos: tuple[str, ...] = WORDNET_POS) -> dict[str, tuple[str, ...]]:
    """Lowercase word -> its WordNet synonyms (the other lemmas of every synset holding it), built once per process.

    Read from the ``wndb(5)`` files ``data.<pos>`` (``offset lex_filenum ss_type w_cnt word lex_id ...``, ``w_cnt``
    in hex); underscores become spaces, adjective markers ``(a)``/``(p)``/``(ip)`` are stripped. Synonyms keep the
    file order (synset by synset) and their own case, so the index is the same in every process. Only single
    words are keys (a whitespace token can only match those); multi-word synonyms are values.

    Raises:
        DataNotFoundError: a ``data.<pos>`` file is missing.
    """
    files = _wordnet_files(root, pos)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataNotFoundError(_missing_message(missing))
    index: dict[str, dict[str, None]] = {}
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  "):  # licence header
                    continue
                head = line.split(" ", 4)
                if len(head) < 5:
                    continue
                n = int(head[3], 16)
                fields = head[4].split(" ", 2 * n)
                lemmas = list(dict.fromkeys(_ADJ_MARKER.sub("", fields[2 * k]).replace("_", " ") for k in range(n)))
                if len(lemmas) < 2:
                    continue
                for lemma in lemmas:
                    key = lemma.lower()
                    if " " in key:
                        continue
                    syn = index.setdefault(key, {})
                    for other in lemmas:
                        if other.lower() != key:
                            syn[other] = None
    return {k: tuple(v) for k, v in index.items() if v}


def _missing_message(missing: Sequence[Path]) -> str:
    lines = ["WordNet files for SynonymReplace not found. Looked for:"]
    lines += [f"  - {p}" for p in missing]
    lines.append("Install them with: apt-get update && apt-get install -y wordnet-base")
    lines.append("or set wordnet_root=/path to a folder holding data.noun, data.verb, data.adj, data.adv.")
    return "\n".join(lines)


def _match_case(word: str, synonym: str) -> str:
    if len(word) > 1 and word.isupper():
        return synonym.upper()
    if word[:1].isupper():
        return synonym[:1].upper() + synonym[1:]
    return synonym


class SynonymReplace(TextOp):
    """Replace each word with probability ``p`` by a random WordNet synonym (EDA's SR; Zhang et al., 2015).

    Matching is on the lowercased word (surrounding punctuation kept); a capitalised word gets a capitalised
    synonym (an all-caps word an all-caps one). Words without synonyms and function words (``a``, ``in``,
    ``it``, ... which WordNet lists as vitamin A, inch, information technology) stay as they are. There is no
    lemmatisation: ``"cars"`` is not looked up as ``"car"``. The index (~150k words for all four parts of
    speech) is built on first use, once per process, and not pickled with the op (dataloader workers rebuild
    or inherit it).

    Args:
        p: replacement probability per word, in ``[0, 1]``.
        wordnet_root: folder with the Debian ``wordnet-base`` files ``data.noun`` etc.
        pos: parts of speech whose synsets are used, a non-empty subset of ``("noun", "verb", "adj", "adv")``.

    Raises:
        DataNotFoundError: a ``data.<pos>`` file is missing (the message gives the apt command).
    """

    _fields = ("p", "wordnet_root", "pos")

    def __init__(self, p: float = 0.1, wordnet_root: str = DEFAULT_WORDNET_ROOT, pos: Sequence[str] = WORDNET_POS):
        self.p = _check_p(p)
        if not isinstance(wordnet_root, (str, Path)) or not str(wordnet_root).strip():
            raise ConfigError(f"wordnet_root={wordnet_root!r} must be a folder path.")
        self.wordnet_root = str(Path(wordnet_root).expanduser())
        kinds = as_list("pos", pos, item=str, allow_empty=False)
        for k in kinds:
            check_choice("pos", k, WORDNET_POS)
        self.pos = tuple(p for p in WORDNET_POS if p in kinds)  # canonical order: one cache entry per set
        missing = [f for f in _wordnet_files(self.wordnet_root, self.pos) if not f.is_file()]
        if missing:  # fail at configuration time, not in the first training batch
            raise DataNotFoundError(_missing_message(missing))

    @property
    def index(self) -> dict[str, tuple[str, ...]]:
        return wordnet_synonyms(self.wordnet_root, self.pos)

    def __call__(self, text: str, rng: random.Random) -> str:
        tokens = text.split()
        if self.p == 0.0 or not tokens:
            return text
        index, changed = self.index, False
        for j, t in enumerate(tokens):
            if rng.random() >= self.p:
                continue
            lead, core, trail = _split(t)
            key = core.lower()
            synonyms = index.get(key) if key not in _STOPWORDS else None
            if synonyms:
                new = _match_case(core, synonyms[rng.randrange(len(synonyms))])
                tokens[j], changed = lead + new + trail, True
        return " ".join(tokens) if changed else text
