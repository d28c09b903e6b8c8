"""How a global sparsity target is spread over layers: global ranking, uniform, or ERK budgets.

* ``"global"`` — one ranking over every selected layer (Han et al. 2015; Lightning's
  ``use_global_unstructured``): layers with many unimportant weights lose more. Handled by
  :func:`~lightning_eff.compression.pruning.masks.compute_masks` directly (no per-layer budget).
* ``"uniform"`` — every layer gets the same sparsity (Zhu & Gupta 2017).
* ``"erk"`` — Erdős–Rényi-Kernel (Evci et al. 2020, RigL, §3; Mocanu et al. 2018 for the
  Erdős–Rényi version): layer ``l`` keeps a density proportional to
  ``(sum of its dimensions) / (product of its dimensions)``, scaled so that the overall density
  meets the target; layers whose density would exceed 1 stay dense and the rest are rescaled.
  Small (thin) layers therefore stay denser than large ones.

Example:
    >>> layer_sparsities({"a": (16, 3, 3, 3), "b": (256, 256)}, 0.8, "erk")  # doctest: +ELLIPSIS
    {'a': 0.0, 'b': 0.805...}
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_choice

__all__ = ["DISTRIBUTIONS", "layer_sparsities", "erk_densities"]

DISTRIBUTIONS = ("global", "uniform", "erk")


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Per-layer densities of the ERK distribution with overall ``density`` (fraction kept).

    Follows the reference implementation of RigL (``sparse_utils.get_sparsities``): repeatedly
    solve ``eps * sum_l raw_l * n_l = density * sum_l n_l`` over the layers not yet dense, where
    ``raw_l = sum(shape) / prod(shape)``; any layer with ``eps * raw_l > 1`` becomes dense and the
    solve is repeated without it.

    Raises:
        ConfigError: ``density`` outside ``(0, 1]``.
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"ERK density={density} must be in (0, 1].")
    numel = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[k] for k in dense)
        denom = sum(raw[k] * numel[k] for k in numel if k not in dense)
        if denom <= 0:
            return {k: 1.0 for k in numel}
        eps = budget / denom
        over = [k for k in numel if k not in dense and eps * raw[k] > 1.0]
        if not over:
            return {k: 1.0 if k in dense else max(0.0, eps * raw[k]) for k in numel}
        dense.update(over)


def layer_sparsities(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str) -> dict[str, float] | None:
    """Per-layer sparsity for ``"uniform"`` / ``"erk"``; ``None`` for ``"global"`` (one ranking).

    Raises:
        ConfigError: unknown distribution.
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if distribution == "global":
        return None
    if distribution == "uniform" or sparsity == 0.0:
        return {k: float(sparsity) for k in shapes}
    return {k: 1.0 - d for k, d in erk_densities(shapes, 1.0 - sparsity).items()}
