"""The ``data.train_transform`` adapters: how a transform reaches the training batches of a datamodule.

Why in the data layer: the datamodules apply the transform (per image on the uint8 store, per text
before tokenization) and must not import the technique layer above them. The ops themselves — timm /
torchvision wrappers, Mixup, text noise — live in :mod:`lightning_eff.learning.augment`, which
re-exports these classes, so configs may name either path.

- :class:`ImageAugment`: per-image ``ops`` on PIL images (grey ``"L"`` or ``"RGB"``, as stored), then
  ``erasing`` on the normalised float batch.
- :class:`TextAugment`: text ops ``op(text, rng) -> str`` composed over the raw strings of a batch.
"""
from __future__ import annotations

import abc
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from lightning_eff.errors import ConfigError
from lightning_eff.validation import as_list, build_node, check_int, check_number

__all__ = ["ImageAugment", "check_image_transform", "TextOp", "TextAugment", "check_text_transform"]


class ImageAugment:
    """The ``data.train_transform`` of the image datamodules: per-image ``ops``, then ``erasing`` per batch.

    Args:
        ops: transforms applied in order to each training image as a PIL image (grey ``"L"`` or ``"RGB"``):
            the factories of this module, any timm/torchvision transform that takes a PIL image, or
            ``{_target_: ...}`` nodes of them.
        erasing: a transform of the normalised float batch ``[B,C,H,W]`` (e.g. :func:`random_erasing`).

    Raises:
        ConfigError: an op that is not callable.
    """

    def __init__(self, ops: Sequence[Any] = (), erasing: Any = None) -> None:
        built = build_node(as_list("data.train_transform.ops", ops), "data.train_transform.ops")
        for i, op in enumerate(built):
            if not callable(op):
                raise ConfigError(f"data.train_transform.ops[{i}]={op!r} is not a transform (not callable).")
        self.ops = built
        self.erasing = build_node(erasing, "data.train_transform.erasing")
        if self.erasing is not None and not callable(self.erasing):
            raise ConfigError(f"data.train_transform.erasing={self.erasing!r} is not a transform (not callable).")

    def __repr__(self) -> str:
        return f"ImageAugment(ops={self.ops!r}, erasing={self.erasing!r})"

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8 [B,C,H,W]`` -> the same shape and dtype, each image through ``ops``."""
        if not self.ops:
            return x
        from torchvision.transforms.v2 import functional as TF

        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            img = TF.to_pil_image(x[i])
            for op in self.ops:
                img = op(img)
            t = TF.pil_to_tensor(img) if not isinstance(img, torch.Tensor) else img
            if t.shape != x.shape[1:]:
                raise ConfigError(f"data.train_transform: an op changed the image shape {tuple(x.shape[1:])} -> "
                                  f"{tuple(t.shape)}; use ops that keep the size (resized_crop, crop) or data.resize.")
            out[i] = t
        return out

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised float batch through ``erasing`` (unchanged without one)."""
        return x if self.erasing is None else self.erasing(x)


def check_image_transform(name: str, value: Any) -> Any:
    """``data.train_transform``: ``None``, an :class:`ImageAugment` (or a node of one), or a list of ops
    (shorthand for ``ImageAugment(ops=...)``)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or (isinstance(value, Mapping) and "_target_" not in value):
        if isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a {{_target_: ...}} node or a list of ops, got {dict(value)!r}.")
        return ImageAugment(ops=value)
    built = build_node(value, name)
    if isinstance(built, ImageAugment):
        return built
    if callable(built):  # one op
        return ImageAugment(ops=[built])
    raise ConfigError(f"{name}={value!r} must be an ImageAugment, a transform or a list of transforms.")


class TextOp(abc.ABC):
    """Base of the word-level ops: ``op(text, rng) -> str`` (subclasses implement :meth:`__call__`)."""

    _fields: tuple[str, ...] = ()

    @abc.abstractmethod
    def __call__(self, text: str, rng: random.Random) -> str:
        """The augmented ``text``, drawing from ``rng``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._fields)
        return f"{type(self).__name__}({args})"


class TextAugment:
    """A composition of text ops: each text, with probability ``p_apply``, goes through every op in turn.

    This is the ``data.train_transform`` of the text datamodules (``list[str] -> list[str]`` on the strings of
    a training batch). Labels never pass through it, so they cannot change.

    Args:
        ops: op objects (``op(text, rng) -> str``) or ``{_target_: dotted.path, ...}`` mappings of them.
        p_apply: probability that a text is augmented at all, in ``[0, 1]``.
        seed: ``None`` draws from Python's global ``random`` (seeded per process and dataloader worker by
            ``seed_everything(workers=True)``); an int gives a private ``random.Random(seed)``. Note that with
            ``num_workers > 0`` every worker starts from a copy of that private state, so prefer ``None`` there.

    Raises:
        ConfigError: an op cannot be built or is not callable, or ``p_apply``/``seed`` is invalid.
    """

    def __init__(self, ops: Sequence[Any] = (), p_apply: float = 1.0, seed: int | None = None):
        built = []
        for i, node in enumerate(as_list("data.train_transform.ops", ops)):
            name = f"data.train_transform.ops[{i}]"
            op = build_node(node, name)
            if not callable(op) or isinstance(op, TextAugment):
                raise ConfigError(f"{name}={node!r} must be a text op, callable as op(text, rng) -> str.")
            built.append(op)
        self.ops: list[Callable[[str, random.Random], str]] = built
        self.p_apply = float(check_number("p_apply", p_apply, low=0.0, high=1.0))
        self.seed = check_int("seed", seed, allow_none=True)
        self._rng = None if self.seed is None else random.Random(self.seed)

    @property
    def rng(self) -> random.Random:
        """The random source: the private generator, or the ``random`` module (same methods) when unseeded."""
        return self._rng if self._rng is not None else random  # type: ignore[return-value]

    def fit(self, texts: Iterable[str]) -> TextAugment:
        """Forward ``texts`` (the training texts) to every op with a ``fit`` (e.g. :class:`SwitchOut`'s vocabulary)."""
        texts = list(texts)
        for op in self.ops:
            if hasattr(op, "fit"):
                op.fit(texts)
        return self

    def augment(self, text: str, rng: random.Random) -> str:
        """Augment one text with ``rng``."""
        if self.p_apply < 1.0 and rng.random() >= self.p_apply:
            return text
        for op in self.ops:
            text = op(text, rng)
        return text

    def __call__(self, texts: Sequence[str]) -> list[str]:
        rng = self.rng
        return [self.augment(t, rng) for t in texts]

    def __repr__(self) -> str:
        return f"TextAugment(ops={self.ops!r}, p_apply={self.p_apply!r}, seed={self.seed!r})"


def check_text_transform(name: str, value: Any) -> Callable[[list[str]], list[str]] | None:
    """``data.train_transform`` of the text datamodules: ``None``, a :class:`TextAugment` (or a ``_target_`` node of
    one), one op (wrapped), a list of ops (shorthand for ``TextAugment(ops=...)``) or any ``list[str] -> list[str]``.

    Raises:
        ConfigError: anything else (a mapping without ``_target_``, a non-callable).
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        if "_target_" not in value:
            raise ConfigError(f"{name} must be a {{_target_: ...}} node or a list of ops, got {dict(value)!r}.")
        return check_text_transform(name, build_node(value, name))
    if isinstance(value, (list, tuple)):
        return TextAugment(ops=value)
    if isinstance(value, TextOp):
        return TextAugment(ops=[value])
    if callable(value):
        return value
    raise ConfigError(f"{name}={value!r} must be a TextAugment, a text op, a list of ops or a callable list[str] -> list[str].")
