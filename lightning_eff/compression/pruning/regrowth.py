"""Regrowth at fixed sparsity: RigL (drop by magnitude, grow by gradient) and SET (grow at random).

Dynamic sparse training keeps the number of live weights constant while moving them: every
``interval`` steps a fraction of the live weights with the smallest magnitude is dropped and the
same number of dead positions is grown (Mocanu et al. 2018, SET: random positions; Evci et al.
2020, RigL: positions with the largest dense-gradient magnitude). Grown weights start at zero,
as in RigL, so the loss does not jump. The drop fraction anneals with a cosine,
``f(t) = alpha / 2 * (1 + cos(pi * t / T_end))`` (RigL eq. 1).

Because our parameters are plain tensors whose pruned entries are zero, ``p.grad`` after
backward *is* the dense gradient RigL needs — no extra backward pass. SET draws positions from a
generator seeded by ``(seed, step, layer index)``, so every rank and every resumed run draws the
same positions.

Example:
    >>> w = torch.tensor([0.5, -0.1, 0.0, 0.0, 0.9]); mask = w != 0
    >>> g = torch.tensor([0.0, 0.0, 3.0, 0.1, 0.0])
    >>> rigl_update(w, mask, g, 1).int()    # drop -0.1 (smallest live), grow index 2 (largest |g|)
    tensor([1, 0, 1, 0, 1], dtype=torch.int32)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_eff.validation import check_choice, check_int, check_number

__all__ = ["REGROWTH", "drop_fraction", "rigl_update", "set_update", "regrow"]

REGROWTH = ("rigl", "set")


def drop_fraction(step: int, alpha: float, begin_step: int, end_step: int) -> float:
    """RigL's cosine-annealed fraction of live weights to move at ``step`` (0 outside ``[begin, end)``)."""
    check_number("regrowth_fraction", alpha, low=0.0, high=1.0)
    if step < begin_step or step >= end_step:
        return 0.0
    return float(alpha / 2.0 * (1.0 + math.cos(math.pi * (step - begin_step) / (end_step - begin_step))))


def _drop(weight: Tensor, mask: Tensor, k: int) -> Tensor:
    """Mask after dropping the ``k`` live weights of smallest magnitude (stable ties)."""
    flat_mask = mask.reshape(-1)
    score = weight.detach().abs().reshape(-1).float().masked_fill(~flat_mask, float("inf"))
    order = torch.argsort(score, stable=True)
    out = flat_mask.clone()
    out[order[:k]] = False
    return out


@torch.no_grad()
def rigl_update(weight: Tensor, mask: Tensor, grad: Tensor, k: int) -> Tensor:
    """RigL: drop ``k`` smallest live weights, grow ``k`` dead positions with the largest ``|grad|``.

    Positions dropped in this update may not be regrown in it (they would just come back); the
    number of live weights is unchanged.
    """
    flat_mask, k, dropped = _drop_smallest(weight, mask, k)
    if k == 0:
        return mask.clone()
    candidates = ~flat_mask  # dead before this update
    score = grad.detach().abs().reshape(-1).float().masked_fill(~candidates, float("-inf"))
    order = torch.argsort(-score, stable=True)
    out = dropped.clone()
    out[order[:k]] = True
    return out.reshape(mask.shape)


def _drop_smallest(weight: Tensor, mask: Tensor, k: int) -> tuple[Tensor, int, Tensor | None]:
    """Shared first half of RigL and SET: clamp ``k`` to what can move, drop the ``k`` smallest live weights."""
    check_int("k", k, low=0)
    flat_mask = mask.reshape(-1).to(torch.bool)
    k = min(k, int(flat_mask.sum()), int((~flat_mask).sum()))
    return flat_mask, k, (_drop(weight, flat_mask, k) if k else None)


@torch.no_grad()
def set_update(weight: Tensor, mask: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """SET: drop ``k`` smallest live weights, grow ``k`` positions chosen uniformly among the dead ones."""
    flat_mask, k, dropped = _drop_smallest(weight, mask, k)
    if k == 0:
        return mask.clone()
    dead = torch.nonzero(~flat_mask.cpu()).flatten()
    pick = dead[torch.randperm(dead.numel(), generator=generator)[:k]]
    out = dropped.clone()
    out[pick.to(out.device)] = True
    return out.reshape(mask.shape)


@torch.no_grad()
def regrow(method: str, weights: dict[str, Tensor], masks: dict[str, Tensor], fraction: float, step: int,
           grads: dict[str, Tensor | None] | None = None, seed: int = 0) -> dict[str, Tensor]:
    """One regrowth update of every layer: moves ``round(fraction * live)`` weights per layer.

    Args:
        method: ``"rigl"`` or ``"set"``.
        weights: ``{name: parameter}``.
        masks: current masks.
        fraction: fraction of each layer's live weights to move (see :func:`drop_fraction`).
        step: global step (seeds SET).
        grads: ``{name: dense gradient}`` for RigL (a layer without a gradient is left unchanged).
        seed: base seed for SET.
    """
    check_choice("regrowth", method, REGROWTH)
    out: dict[str, Tensor] = {}
    for i, (name, mask) in enumerate(masks.items()):
        k = int(round(fraction * int(mask.sum())))
        if method == "rigl":
            g = (grads or {}).get(name)
            out[name] = mask.clone() if g is None else rigl_update(weights[name], mask, g, k)
        else:
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) * 7919 + i)
            out[name] = set_update(weights[name], mask, k, gen)
    return out
