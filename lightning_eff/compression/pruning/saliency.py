"""Saliency: how much each weight matters (survey §3.1.1, "saliency-based pruning").

Element-wise scores, larger = more important; :mod:`masks` removes the lowest ones.

* ``"l1"`` — magnitude ``|w|`` (Han et al. 2015). A group (channel, block) scores ``sum |w|``.
* ``"l2"`` — ``w²`` per element; a group scores its L2 norm ``sqrt(sum w²)`` (Li et al. 2017
  rank filters by norm). Element-wise, L1 and L2 give the same order.
* ``"taylor"`` — first-order Taylor estimate of the loss change when ``w`` is removed,
  ``|w · ∂L/∂w|`` (Molchanov et al. 2017/2019), averaged over the batches seen since the last mask
  update (:class:`GradientStats`).
* ``"obd"`` — Optimal Brain Damage (LeCun, Denker & Solla 1990): ``½ · h_ii · w²`` with the
  diagonal of the Hessian approximated by the empirical Fisher, the mean of squared gradients
  ``E[(∂L/∂w)²]`` (the approximation used by e.g. Theis et al. 2018 and WoodFisher).

Example:
    >>> w = torch.tensor([1.0, -2.0, 0.5]); g = torch.tensor([0.1, 0.0, 2.0])
    >>> saliency_scores(w, "taylor", grad_weight=(w * g).abs())
    tensor([0.1000, 0.0000, 1.0000])
    >>> saliency_scores(w, "obd", fisher=g * g)
    tensor([0.0050, 0.0000, 0.5000])
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_choice

__all__ = ["SALIENCIES", "GRADIENT_SALIENCIES", "saliency_scores", "GradientStats"]

SALIENCIES = ("l1", "l2", "taylor", "obd")
#: Saliencies that need gradient statistics collected during training.
GRADIENT_SALIENCIES = ("taylor", "obd")


@torch.no_grad()
def saliency_scores(weight: Tensor, method: str = "l1", grad_weight: Tensor | None = None, fisher: Tensor | None = None) -> Tensor:
    """Element-wise saliency of ``weight`` (float32, same shape).

    Args:
        weight: the parameter.
        method: one of :data:`SALIENCIES`.
        grad_weight: for ``"taylor"``: the mean of ``|w · g|`` over recent batches (or one batch).
        fisher: for ``"obd"``: the mean of ``g²`` (diagonal empirical Fisher).

    Raises:
        ConfigError: unknown method, or a gradient saliency without its statistics.
    """
    check_choice("saliency", method, SALIENCIES)
    w = weight.detach().float()
    if method == "l1":
        return w.abs()
    if method == "l2":
        return w * w
    if method == "taylor":
        if grad_weight is None:
            raise ConfigError("saliency='taylor' needs gradient statistics (|w·dL/dw|): run at least one backward pass first.")
        return grad_weight.detach().float().abs().reshape(w.shape)
    if fisher is None:
        raise ConfigError("saliency='obd' needs the diagonal Fisher (mean of squared gradients): run at least one backward pass first.")
    return 0.5 * fisher.detach().float().reshape(w.shape) * w * w


class GradientStats:
    """Running means of the gradient statistics the Taylor / OBD saliencies need.

    Call :meth:`update` once per optimizer step (after backward, before the step) with the
    parameters; :meth:`scores` turns the means into saliencies; :meth:`reset` after each mask
    update so that the next update ranks by recent behaviour. State is plain tensors
    (:meth:`state_dict`), so a resumed run continues the same means.

    Args:
        method: ``"taylor"`` (accumulates ``|w·g|``) or ``"obd"`` (accumulates ``g²``).
    """

    def __init__(self, method: str) -> None:
        self.method = check_choice("saliency", method, GRADIENT_SALIENCIES)
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    @torch.no_grad()
    def update(self, params: Mapping[str, Tensor]) -> None:
        """Add one batch's statistics (parameters without a gradient are skipped)."""
        added = False
        for name, p in params.items():
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            stat = (p.detach().float() * g).abs() if self.method == "taylor" else g * g
            if name in self.sums:
                self.sums[name].add_(stat)
            else:
                self.sums[name] = stat.clone()
            added = True
        self.count += int(added)

    def mean(self, name: str) -> Tensor | None:
        """The running mean for parameter ``name`` (``None`` before any update)."""
        if self.count == 0 or name not in self.sums:
            return None
        return self.sums[name] / self.count

    def scores(self, name: str, weight: Tensor) -> Tensor:
        """Saliency of parameter ``name`` from the accumulated statistics."""
        stat = self.mean(name)
        if self.method == "taylor":
            return saliency_scores(weight, "taylor", grad_weight=stat)
        return saliency_scores(weight, "obd", fisher=stat)

    def reset(self) -> None:
        """Forget the statistics (after a mask update)."""
        self.sums = {}
        self.count = 0

    def state_dict(self) -> dict:
        """Plain tensors and ints (loadable with ``torch.load(weights_only=True)``)."""
        return {"method": self.method, "count": self.count, "sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()}}

    def load_state_dict(self, state: Mapping, device: torch.device | None = None) -> None:
        """Restore :meth:`state_dict` output."""
        self.count = int(state.get("count", 0))
        self.sums = {k: v.to(device) if device is not None else v.clone() for k, v in state.get("sums", {}).items()}
