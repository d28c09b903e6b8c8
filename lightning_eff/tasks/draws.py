"""Random draws of a training step that a resumed fit repeats exactly.

Self-supervised tasks draw their corruption inside ``training_step`` (SimCLR's two views, MLM's masks).
Drawn from torch's global stream, ``fit(ckpt_path=...)`` would draw different ones from the step it
resumes at: Lightning restores the weights, the optimizer and the loops, not the random stream. A
:class:`StepDraws` task instead draws each training batch's corruption from a seed of its own, made of
the run's seed, the epoch, the batch index and the process rank; the run's seed travels in the
checkpoint. The same batch therefore gets the same views or masks in an uninterrupted run and in a
resumed one, every DDP rank draws its own, and the global stream (dropout, data order) is left alone.

The run's seed is ``torch.initial_seed()`` when fit starts (what ``seed_everything`` or ``torch.manual_seed``
chose; rank 0's, broadcast to every rank), unless a checkpoint brought one.

What this does not cover: a checkpoint taken in the middle of an epoch (Lightning resumes the batch index,
while a plain dataloader starts the epoch again from its first batch), and what is drawn from the global
stream — a shuffling sampler's order and dropout — which Lightning does not restore either.

Example:
    >>> import torch
    >>> class Task(StepDraws):
    ...     pass
    >>> t = Task()
    >>> t.draw_seed = 7
    >>> with t.step_rng(epoch=0, batch_idx=3):
    ...     a = torch.rand(2)
    >>> with t.step_rng(epoch=0, batch_idx=3):
    ...     b = torch.rand(2)
    >>> bool(torch.equal(a, b))
    True
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["StepDraws", "CHECKPOINT_KEY", "step_seed"]

#: Where the run's draw seed is kept in a Lightning checkpoint.
CHECKPOINT_KEY = "lightning_eff_draw_seed"
_MASK = (1 << 63) - 1


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int = 0) -> int:
    """A 63-bit seed for one training batch of one process (distinct ``(epoch, batch_idx, rank)`` give distinct
    seeds with overwhelming probability: each part is mixed in splitmix64 style)."""
    x = (int(seed) & _MASK) ^ 0x9E3779B97F4A7C15
    for part in (epoch, batch_idx, rank):  # splitmix64-style mixing of each part
        x = (x + (int(part) + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
        x ^= x >> 31
        x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return x & _MASK


class StepDraws:
    """Mixin for a LightningModule: :meth:`step_rng` / :meth:`step_generator` give resume-exact training draws."""

    draw_seed: int | None = None

    def _ensure_draw_seed(self) -> int:
        if self.draw_seed is None:
            self.draw_seed = int(torch.initial_seed()) & _MASK
        return self.draw_seed

    def on_fit_start(self) -> None:  # noqa: D102  (Lightning hook: after a checkpoint's seed is loaded)
        trainer = getattr(self, "_trainer", None)
        if self.draw_seed is None:
            seed = self._ensure_draw_seed()
            self.draw_seed = int(trainer.strategy.broadcast(seed, src=0)) if trainer is not None else seed
        parent = getattr(super(), "on_fit_start", None)
        if parent is not None:
            parent()

    def _position(self, epoch: int | None) -> tuple[int, int]:
        trainer = getattr(self, "_trainer", None)
        if epoch is None:
            epoch = int(trainer.current_epoch) if trainer is not None else 0
        rank = int(trainer.global_rank) if trainer is not None else 0
        return epoch, rank

    def batch_seed(self, batch_idx: int, epoch: int | None = None) -> int:
        """The seed of training batch ``batch_idx`` of ``epoch`` (default: the trainer's current epoch) on this rank."""
        epoch, rank = self._position(epoch)
        return step_seed(self._ensure_draw_seed(), epoch, batch_idx, rank)

    def step_generator(self, batch_idx: int, device: Any = "cpu", epoch: int | None = None) -> torch.Generator:
        """A ``torch.Generator`` on ``device`` seeded for this training batch."""
        return torch.Generator(device=device).manual_seed(self.batch_seed(batch_idx, epoch))

    @contextlib.contextmanager
    def step_rng(self, batch_idx: int, device: Any = "cpu", epoch: int | None = None) -> Iterator[None]:
        """Inside: torch's CPU stream (and ``device``'s, when it is a CUDA device) seeded for this batch; both restored after."""
        dev = torch.device(device)
        seed = self.batch_seed(batch_idx, epoch)
        cuda = dev.type == "cuda"
        with torch.random.fork_rng(devices=[dev] if cuda else []):
            torch.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(dev):
                    torch.cuda.manual_seed(seed)
            yield

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102  (Lightning hook)
        checkpoint[CHECKPOINT_KEY] = self._ensure_draw_seed()
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102  (Lightning hook)
        if checkpoint.get(CHECKPOINT_KEY) is not None:
            self.draw_seed = int(checkpoint[CHECKPOINT_KEY])
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
