"""Ternary hash projection: raw text -> ``[B, L, T*r/2]`` features with no embedding table.

The survey (§3.4.2, "projection layers") replaces the ``V x d`` embedding table of a text model
by a parameter-free projection: every token is hashed by ``T`` seeded hash functions into ``r``
bits each, and every pair of bits becomes one ternary feature in ``{-1, 0, +1}`` (``00``/``11``
-> 0, ``10`` -> +1, ``01`` -> -1, so P(0) = 1/2), as in SGNN (Ravi & Kozareva, 2018), PRADO
(Kaliamoorthi et al., EMNLP 2019) and pQRNN (Kaliamoorthi et al., 2021). The model then learns
only a small dense layer on top: O(T*r*d) weights instead of O(V*d), and no vocabulary at all,
so unseen words, typos and new domains still get (distinct) features.

Two token modes:

- ``char_ngrams=0`` (default): a word's features are its hash bits. Two different words get
  independent random ternary vectors (a random projection of the word's one-hot vector).
- ``char_ngrams=n``: SimHash (Charikar, STOC 2002) over the word's character n-grams
  (with ``<`` and ``>`` boundary marks) and the word itself: sum the ternary vectors of the
  pieces and keep the sign. This is locality sensitive: words sharing most n-grams
  (``colour``/``color``, typos) get mostly equal features.

Determinism: Python's ``hash()`` is salted per process (``PYTHONHASHSEED``), so it is never
used. Each distinct token is hashed once with ``blake2b`` (8-byte digest of its UTF-8 bytes);
the ``T`` hash functions are then the splitmix64 finaliser (Steele et al., OOPSLA 2014) applied
to ``key ^ seed_t`` in vectorised little-endian ``uint64`` numpy arithmetic, which wraps the
same way on every platform. Same text, same seed -> bit-identical features in any process.

Why the hashing stays outside the exported graph: TorchScript/ExecuTorch cannot run hashlib on
strings; the models split into this Python pre-processing and a tensor-only part
(``forward_features``) that quantizes and exports. An app re-implements :meth:`hash_tokens`
(blake2b + splitmix64, both tiny and standard) in its own language.

Example:
    >>> proj = TernaryProjection(num_hashes=4, hash_bits=32)
    >>> feats, mask = proj(["A cat sat.", "dogs"])
    >>> feats.shape, mask.tolist()
    (torch.Size([2, 3, 64]), [[True, True, True], [True, False, False]])
    >>> sorted(feats.unique().tolist())
    [-1.0, 0.0, 1.0]
"""
from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_int

__all__ = ["TernaryProjection", "tokenize", "splitmix64"]

_TOKEN = re.compile(r"[^\W_]+")  # runs of letters/digits (Unicode-aware); everything else separates
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def tokenize(text: str, max_tokens: int | None = None) -> list[str]:
    """Lower-case ``text`` and split it on non-alphanumerics (no vocabulary needed)."""
    tokens = _TOKEN.findall(text.lower())
    return tokens if max_tokens is None else tokens[:max_tokens]


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on ``uint64`` arrays: a bijective, well-mixing 64-bit hash."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _token_keys(tokens: Sequence[str]) -> np.ndarray:
    """One stable 64-bit key per token: blake2b (8-byte digest) of its UTF-8 bytes, little-endian."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest() for t in tokens)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


class TernaryProjection(nn.Module):
    """Raw text -> ternary token features ``[B, L, num_hashes * hash_bits / 2]`` and a mask ``[B, L]``.

    Zero trainable parameters and no buffers: nothing of it is stored in a checkpoint but its
    settings. A small LRU cache (token -> feature row) makes repeated words cost a dict lookup.

    Args:
        num_hashes: ``T``, the number of seeded hash functions.
        hash_bits: ``r``, bits per hash function (even, 2..512); two bits give one ternary feature.
        seed: selects the family of hash functions (a different seed = different features).
        char_ngrams: 0 for word hashing, ``n >= 2`` for SimHash over character n-grams.
        max_tokens: tokens kept per text (longer texts are truncated).
        cache_size: tokens kept in the LRU cache (0 disables it).

    Raises:
        ConfigError: an option out of range (named ``model.<option>``).
    """

    def __init__(
        self,
        num_hashes: int = 8,
        hash_bits: int = 128,
        seed: int = 0,
        char_ngrams: int = 0,
        max_tokens: int = 64,
        cache_size: int = 16384,
    ) -> None:
        super().__init__()
        self.num_hashes = check_int("model.num_hashes", num_hashes, low=1, high=256)
        self.hash_bits = check_int("model.hash_bits", hash_bits, low=2, high=512)
        if hash_bits % 2:
            raise ConfigError(f"model.hash_bits={hash_bits!r} must be even (two bits make one ternary feature).")
        self.seed = check_int("model.seed", seed, low=0, high=2**62)
        self.char_ngrams = check_int("model.char_ngrams", char_ngrams, low=0, high=8)
        if self.char_ngrams == 1:
            raise ConfigError("model.char_ngrams=1 is not useful (single characters); use 0 (words) or 2..8.")
        self.max_tokens = check_int("model.max_tokens", max_tokens, low=1)
        self.cache_size = check_int("model.cache_size", cache_size, low=0)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        # Seeds of the T hash functions and of the 64-bit chunks each needs (r bits -> ceil(r/64) words).
        chunks = (self.hash_bits + 63) // 64
        index = np.arange(self.num_hashes * chunks, dtype=np.uint64)
        self._seeds = splitmix64(splitmix64(np.uint64(self.seed) ^ _GOLDEN) + index).reshape(self.num_hashes, chunks)

    @property
    def out_features(self) -> int:
        """Ternary features per token: ``num_hashes * hash_bits // 2``."""
        return self.num_hashes * self.hash_bits // 2

    def extra_repr(self) -> str:  # noqa: D102
        return (f"num_hashes={self.num_hashes}, hash_bits={self.hash_bits}, seed={self.seed}, "
                f"char_ngrams={self.char_ngrams}, out_features={self.out_features}")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # a cache is not worth pickling (DDP spawn, deepcopy)
        return state

    # ---------------------------------------------------------------------------- hashing
    def _ternary(self, keys: np.ndarray) -> np.ndarray:
        """``uint64 [N]`` keys -> ``int8 [N, T*r/2]`` ternary features (vectorised over N, T, chunks)."""
        words = splitmix64(keys[:, None, None] ^ self._seeds[None])  # [N, T, chunks]
        bits = np.unpackbits(words.astype("<u8").view(np.uint8).reshape(len(keys), self.num_hashes, -1),
                             axis=-1, bitorder="little")[..., : self.hash_bits]
        ternary = bits[..., 0::2].astype(np.int8) - bits[..., 1::2].astype(np.int8)  # 10->+1, 01->-1, else 0
        return ternary.reshape(len(keys), self.out_features)

    def _compute(self, tokens: Sequence[str]) -> np.ndarray:
        if not self.char_ngrams:
            return self._ternary(_token_keys(tokens))
        # SimHash: sign of the sum of the ternary vectors of the word and of its char n-grams.
        n = self.char_ngrams
        pieces, owner = [], []
        for i, token in enumerate(tokens):
            marked = f"<{token}>"
            grams = [token] + [marked[j : j + n] for j in range(max(1, len(marked) - n + 1))]
            pieces.extend(grams)
            owner.extend([i] * len(grams))
        vectors = self._ternary(_token_keys(pieces)).astype(np.int32)
        sums = np.zeros((len(tokens), self.out_features), dtype=np.int32)
        np.add.at(sums, np.asarray(owner), vectors)
        return np.sign(sums).astype(np.int8)

    def hash_tokens(self, tokens: Sequence[str]) -> np.ndarray:
        """Ternary features ``int8 [len(tokens), out_features]``; each distinct token is hashed once."""
        unique = list(dict.fromkeys(tokens))
        rows: dict[str, np.ndarray] = {}
        missing = []
        for token in unique:
            row = self._cache.get(token)
            if row is None:
                missing.append(token)
            else:
                self._cache.move_to_end(token)
                rows[token] = row
        if missing:
            computed = self._compute(missing)
            for token, row in zip(missing, computed):
                rows[token] = row
                if self.cache_size:
                    self._cache[token] = row
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if not tokens:
            return np.zeros((0, self.out_features), dtype=np.int8)
        return np.stack([rows[t] for t in tokens])

    def forward(self, text: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Project a batch of raw strings.

        Returns:
            ``features`` float32 ``[B, L, out_features]`` in {-1, 0, +1} (zeros at padding) and
            ``mask`` bool ``[B, L]`` (True at real tokens); ``L = max(1, longest text)``.

        Raises:
            ConfigError: ``text`` is a single string or holds non-strings.
        """
        if isinstance(text, str) or not all(isinstance(t, str) for t in text):
            raise ConfigError(f"projection input must be a list of strings, got {type(text).__name__}.")
        token_lists = [tokenize(t, self.max_tokens) for t in text]
        lengths = [len(t) for t in token_lists]
        length = max([1, *lengths])
        flat = [tok for toks in token_lists for tok in toks]
        table = self.hash_tokens(flat)
        out = np.zeros((len(text), length, self.out_features), dtype=np.float32)
        mask = np.zeros((len(text), length), dtype=bool)
        start = 0
        for row, n in enumerate(lengths):
            out[row, :n] = table[start : start + n]
            mask[row, :n] = True
            start += n
        return torch.from_numpy(out), torch.from_numpy(mask)
