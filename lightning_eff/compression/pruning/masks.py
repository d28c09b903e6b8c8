"""Masks from saliency scores: granularity (unstructured, N:M, blocks, channels) and distribution.

A mask is a ``bool`` tensor shaped like its parameter, ``True`` = kept. Masks are plain tensors
held beside plain ``nn.Parameter`` s — no ``torch.nn.utils.prune`` reparametrization — so that
checkpoints, ``load_from_checkpoint``, FX tracing for QAT and ``deepcopy`` see an ordinary model
whose pruned weights are exactly zero (RELIABILITY.md: upstream ``prune -> prepare_qat`` crashes
on the ``weight_orig``/``weight_mask`` pair).

Granularity (the survey's §3.1.1 "structured vs unstructured"):

* ``"unstructured"`` — single weights; the best accuracy per removed weight, no speed-up on
  dense kernels.
* ``"nm"`` — N:M fine-grained structured sparsity (e.g. 2:4, Mishra et al. 2021, NVIDIA
  Ampere): in every group of ``m`` consecutive weights along the input-channel axis, exactly
  ``n`` are kept. Conv weights ``[O, I, kh, kw]`` are grouped along ``I`` (ASP's layout).
* ``"block"`` — ``bh × bw`` tiles of the 2-D view ``[out, in·kh·kw]`` (block-sparse kernels).
* ``"channel"`` — whole output channels / filters / neurons (rows of the 2-D view).

Groups are ranked by the *mean* of their element scores, so blocks at an edge (partial tiles) and
channels of different layers under ``distribution="global"`` compare fairly; within one layer
this is the same order as the group's L1 norm (or L2 norm for ``saliency="l2"``).

Ties are broken by a stable sort (lower flat index pruned first), so the same scores give the
same mask on every rank and every run.

Example:
    >>> w = torch.tensor([[0.1, -0.9, 0.3, 0.0], [1.0, 0.2, -0.05, 0.7]])
    >>> compute_masks({"w": w.abs()}, 0.5, "nm", n=2, m=4)["w"].int()
    tensor([[0, 1, 1, 0],
            [1, 0, 0, 1]], dtype=torch.int32)
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_eff.compression.pruning.distribution import (
    DISTRIBUTIONS,
    layer_sparsities,
)
from lightning_eff.errors import ConfigError, NoEffectWarning
from lightning_eff.schedules import check_sparsity
from lightning_eff.validation import check_choice, check_int

__all__ = [
    "GRANULARITIES",
    "check_nm",
    "check_block",
    "nm_mask",
    "nm_compatible",
    "group_scores",
    "expand_groups",
    "compute_masks",
    "apply_masks",
    "mask_gradients",
    "mask_sparsity",
]

GRANULARITIES = ("unstructured", "nm", "block", "channel")


def check_nm(n: int, m: int) -> tuple[int, int]:
    """Validate an N:M pattern (``1 <= n < m``)."""
    check_int("m", m, low=2)
    check_int("n", n, low=1, high=m - 1)
    return int(n), int(m)


def check_block(block: Sequence[int]) -> tuple[int, int]:
    """Validate a block shape ``[rows, cols]`` of positive ints."""
    if isinstance(block, (str, bytes)) or not isinstance(block, Sequence) or len(block) != 2:
        raise ConfigError(f"block={block!r} must be two positive integers [rows, cols], e.g. [1, 4].")
    return check_int("block[0]", block[0], low=1), check_int("block[1]", block[1], low=1)


def _nm_view(t: Tensor) -> Tensor:
    """``[..., I]`` layout: the input-channel axis last (conv ``[O,I,*k] -> [O,*k,I]``)."""
    if t.dim() >= 3:
        return t.movedim(1, -1)
    return t.reshape(t.shape[0], -1) if t.dim() == 2 else t.reshape(1, -1)


def nm_compatible(shape: Sequence[int], m: int) -> bool:
    """Whether a parameter of ``shape`` can hold an N:M pattern (input axis divisible by ``m``)."""
    axis = shape[1] if len(shape) >= 2 else shape[0]
    return axis % m == 0


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` along the input axis.

    Raises:
        ConfigError: the input axis is not divisible by ``m``.
    """
    check_nm(n, m)
    if not nm_compatible(tuple(scores.shape), m):
        raise ConfigError(f"N:M {n}:{m} needs the input axis divisible by m={m}; shape {tuple(scores.shape)} is not.")
    view = _nm_view(scores)
    groups = view.reshape(-1, m)
    order = torch.argsort(-groups, dim=1, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    keep = keep.reshape(view.shape)
    if scores.dim() >= 3:
        return keep.movedim(-1, 1).contiguous()
    return keep.reshape(scores.shape)


def _matrix(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def group_scores(scores: Tensor, granularity: str, block: Sequence[int] = (1, 4)) -> tuple[Tensor, Tensor | None]:
    """Per-group mean scores and group sizes (flattened, in row-major group order); sizes are
    ``None`` for single weights (every group has size 1)."""
    if granularity == "unstructured":
        return scores.reshape(-1), None
    mat = _matrix(scores)
    if granularity == "channel":
        return mat.mean(dim=1), torch.full((mat.shape[0],), mat.shape[1], dtype=torch.long)
    bh, bw = check_block(block)
    rows, cols = mat.shape
    pr, pc = (-rows) % bh, (-cols) % bw
    padded = torch.nn.functional.pad(mat, (0, pc, 0, pr))
    counts = torch.nn.functional.pad(torch.ones_like(mat), (0, pc, 0, pr))
    shape = (padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
    # Padding adds zeros to sums and counts alike, so an edge block's mean covers its real elements only.
    sums = padded.reshape(shape).sum(dim=(1, 3))
    sizes = counts.reshape(shape).sum(dim=(1, 3))
    return (sums / sizes).reshape(-1), sizes.reshape(-1).long()


def expand_groups(keep: Tensor, shape: Sequence[int], granularity: str, block: Sequence[int] = (1, 4)) -> Tensor:
    """Turn a per-group keep vector back into an element mask of ``shape``."""
    if granularity == "unstructured":
        return keep.reshape(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows
    if granularity == "channel":
        return keep.reshape(rows, 1).expand(rows, cols).reshape(shape).clone()
    bh, bw = check_block(block)
    grid = keep.reshape(-(-rows // bh), -(-cols // bw))
    full = grid.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:rows, :cols]
    return full.reshape(shape).contiguous()


def _prune_lowest(scores: Tensor, sizes: Tensor | None, target_elements: float) -> Tensor:
    """Keep-vector that prunes lowest-score groups while the pruned element count stays <= target.

    Ties go by index (lowest first), exactly as a stable sort would order them. Unit-size groups
    (single weights) use an O(n) selection (``kthvalue``) instead of a full sort: a global mask
    update of a 3.5M-weight MobileNetV2 then costs milliseconds, not a second.
    """
    if sizes is None:
        n = scores.numel()
        k = min(n, int(target_elements + 1e-6))
        keep = torch.ones_like(scores, dtype=torch.bool)
        if k == 0:
            return keep
        thr = torch.kthvalue(scores.cpu(), k).values.to(scores.device)
        below = scores < thr
        keep[below] = False
        need = k - int(below.sum())
        if need > 0:
            keep[torch.nonzero(scores == thr).flatten()[:need]] = False
        return keep
    order = torch.argsort(scores, stable=True)
    cum = torch.cumsum(sizes[order], 0)
    count = int((cum <= target_elements + 1e-6).sum())
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[order[:count]] = False
    return keep


@torch.no_grad()
def compute_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    granularity: str = "unstructured",
    distribution: str = "global",
    *,
    n: int = 2,
    m: int = 4,
    block: Sequence[int] = (1, 4),
    previous: Mapping[str, Tensor] | None = None,
    min_keep: int = 1,
    allow_full: bool = False,
) -> dict[str, Tensor]:
    """Masks that prune ``sparsity`` of the scored elements (fewest-salient first).

    Args:
        scores: ``{name: element scores}`` (higher = keep), e.g. from :func:`saliency_scores`.
        sparsity: fraction of elements to remove, over all layers (``"global"``) or per layer.
            Ignored for ``"nm"``, whose sparsity is ``1 - n/m`` by construction.
        granularity: one of :data:`GRANULARITIES`.
        distribution: ``"global"``, ``"uniform"`` or ``"erk"`` (see ``distribution.py``).
        n, m: the N:M pattern.
        block: ``[rows, cols]`` of a block.
        previous: earlier masks; their pruned elements stay pruned (schedules only grow).
        min_keep: groups every layer keeps (a layer pruned away entirely disconnects the network).
        allow_full: accept ``sparsity=1.0``.

    Returns:
        ``{name: bool mask}`` on each score tensor's device.

    Raises:
        ConfigError: bad option values.

    Warns:
        NoEffectWarning: N:M layers whose input axis is not divisible by ``m`` (left dense).
    """
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_sparsity("sparsity", sparsity, allow_full)
    check_int("min_keep", min_keep, low=0)
    work: dict[str, Tensor] = {}
    for name, s in scores.items():
        s = s.detach().float()
        if previous is not None and name in previous:
            s = s.masked_fill(~previous[name].to(s.device, torch.bool), float("-inf"))
        work[name] = s
    if granularity == "nm":
        n, m = check_nm(n, m)
        skipped = [k for k, s in work.items() if not nm_compatible(tuple(s.shape), m)]
        if skipped:
            warnings.warn(f"N:M {n}:{m}: input axis not divisible by {m} in {skipped}; these layers stay dense.", NoEffectWarning, stacklevel=2)
        return {k: torch.ones_like(s, dtype=torch.bool) if k in skipped else nm_mask(s, n, m) for k, s in work.items()}
    groups = {k: group_scores(s.cpu(), granularity, block) for k, s in work.items()}
    keeps: dict[str, Tensor] = {}
    per_layer = layer_sparsities({k: tuple(s.shape) for k, s in work.items()}, sparsity, distribution)
    if per_layer is None:
        names = list(groups)
        all_scores = torch.cat([groups[k][0] for k in names]) if names else torch.zeros(0)
        if granularity == "unstructured":
            keep_all = _prune_lowest(all_scores, None, sparsity * all_scores.numel())
        else:
            all_sizes = torch.cat([groups[k][1] for k in names])
            keep_all = _prune_lowest(all_scores, all_sizes, sparsity * float(all_sizes.sum()))
        offset = 0
        for k in names:
            count = groups[k][0].numel()
            keeps[k] = keep_all[offset: offset + count]
            offset += count
    else:
        for k, (g, sizes) in groups.items():
            total = g.numel() if sizes is None else float(sizes.sum())
            keeps[k] = _prune_lowest(g, sizes, per_layer[k] * total)
    for k, keep in keeps.items():
        # A layer must keep min_keep groups (the best ones) unless the user allowed full pruning.
        need = min(min_keep, keep.numel()) - int(keep.sum())
        if need > 0 and not (allow_full and sparsity == 1.0):
            best = torch.argsort(-groups[k][0], stable=True)[: min(min_keep, keep.numel())]
            keep[best] = True
    return {k: expand_groups(keeps[k], tuple(work[k].shape), granularity, block).to(work[k].device) for k in work}


@torch.no_grad()
def apply_masks(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned entries of each parameter in place (``p *= mask``)."""
    for name, mask in masks.items():
        p = params.get(name)
        if p is not None:
            p.mul_(mask)


@torch.no_grad()
def mask_gradients(params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero the gradients of pruned entries, so momentum and Adam moments never move them."""
    for name, mask in masks.items():
        p = params.get(name)
        if p is not None and p.grad is not None:
            p.grad.mul_(mask)


def mask_sparsity(masks: Mapping[str, Tensor]) -> tuple[dict[str, float], float]:
    """Per-mask sparsity and the global sparsity over all masked elements."""
    per = {k: 1.0 - float(m.sum()) / max(m.numel(), 1) for k, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return per, (1.0 - kept / total if total else 0.0)
