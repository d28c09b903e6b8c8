"""Structured channel pruning that physically removes channels (real speed-ups on dense kernels).

Unstructured zeros do not make dense CPU kernels faster; fewer channels do. Removing a channel
means slicing every tensor that touches it, so channels are grouped by *dependency*: the tensors
that must lose the same index together. For the inverted-residual blocks of MobileNetV2
(Sandler et al. 2018) and EfficientNet-style heads we find the groups ourselves:

* **expansion group** of an ``InvertedResidual``: ``conv_pw`` output filters, ``bn1``,
  the depthwise ``conv_dw`` (its ``groups`` shrink with it), ``bn2`` and the input columns of
  ``conv_pwl``. The block's input and output (the residual stream) are untouched, so residual
  additions need no coupling across blocks.
* **head group**: ``conv_head`` output filters, ``bn2`` and the input features of ``classifier``
  (global pooling in between keeps the channel index).

While training, a channel is pruned by masking *every* member slice (weights, BN scale and
shift), so its contribution is exactly zero and removing it later preserves outputs exactly
(:func:`compact`). Torch-Pruning (DepGraph, Fang et al. 2023) finds such groups for arbitrary
graphs; we do not depend on it (see the module's notes in the README) because the groups of the
models we ship are few and explicit, and the masks must be plain tensors for QAT and resume.

Example:
    >>> from lightning_eff.models import create_model
    >>> net = create_model("mobilenetv2_tiny").eval()
    >>> small = prune_channels(net, 0.5)
    >>> count_parameters(small) < count_parameters(net)
    True
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_eff.compression.pruning.masks import compute_masks
from lightning_eff.compression.pruning.saliency import saliency_scores
from lightning_eff.errors import ConfigError
from lightning_eff.infra.footprint import count_parameters  # noqa: F401  (doctest)
from lightning_eff.validation import check_bool, check_choice, check_int

__all__ = ["ChannelGroup", "find_channel_groups", "group_masks", "channel_keep", "compact", "prune_channels", "channel_scores"]


@dataclass
class ChannelGroup:
    """Tensors that share one channel index and must be pruned together.

    Attributes:
        name: the owning module's path (``"blocks.1.0"``) or ``"head"``.
        channels: number of channels in the group.
        producer: the conv whose output filters define the channels (scored for saliency).
        members: ``(parameter name, dim)`` pairs sliced at the channel index.
        modules: ``(module path, role)`` pairs to rebuild when channels are removed; role is
            ``"out"`` (conv output), ``"dw"`` (depthwise conv), ``"bn"``, ``"in"`` (conv input)
            or ``"linear_in"``.
    """

    name: str
    channels: int
    producer: str
    members: list[tuple[str, int]] = field(default_factory=list)
    modules: list[tuple[str, str]] = field(default_factory=list)


def _is_dw(conv: nn.Module, channels: int) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.groups == channels == conv.in_channels == conv.out_channels


def _add_module(group: ChannelGroup, model: nn.Module, path: str, role: str) -> None:
    module = model.get_submodule(path)
    group.modules.append((path, role))
    dim = 1 if role in ("in", "linear_in") else 0
    for attr in ("weight", "bias"):
        p = getattr(module, attr, None)
        if isinstance(p, nn.Parameter) and not (dim == 1 and attr == "bias"):
            group.members.append((f"{path}.{attr}", dim))


def find_channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """Dependency groups of MobileNetV2-style inverted residual blocks and an EfficientNet-style head.

    A block qualifies when it has ``conv_pw -> bn1 -> conv_dw (depthwise) -> bn2 -> conv_pwl``
    with matching channel counts and no squeeze-excitation in between (``se`` absent or
    ``Identity``). The head qualifies when ``conv_head``, ``bn2`` and a ``classifier`` Linear of
    matching size are children of the model. Other layers are left alone.
    """
    groups: list[ChannelGroup] = []
    for path, mod in model.named_modules():
        names = ("conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl")
        if not all(isinstance(getattr(mod, n, None), nn.Module) for n in names):
            continue
        if not isinstance(getattr(mod, "se", nn.Identity()), nn.Identity):
            continue
        pw, bn1, dw, bn2, pwl = (getattr(mod, n) for n in names)
        c = getattr(pw, "out_channels", None)
        if not (isinstance(pw, nn.Conv2d) and pw.groups == 1 and _is_dw(dw, c) and isinstance(pwl, nn.Conv2d) and pwl.groups == 1
                and pwl.in_channels == c and isinstance(bn1, nn.BatchNorm2d) and isinstance(bn2, nn.BatchNorm2d)
                and bn1.num_features == c == bn2.num_features):
            continue
        prefix = f"{path}." if path else ""
        group = ChannelGroup(name=path, channels=c, producer=f"{prefix}conv_pw.weight")
        for n, role in (("conv_pw", "out"), ("bn1", "bn"), ("conv_dw", "dw"), ("bn2", "bn"), ("conv_pwl", "in")):
            _add_module(group, model, prefix + n, role)
        groups.append(group)
    head, bn, fc = (getattr(model, n, None) for n in ("conv_head", "bn2", "classifier"))
    if (isinstance(head, nn.Conv2d) and head.groups == 1 and isinstance(bn, nn.BatchNorm2d) and isinstance(fc, nn.Linear)
            and head.out_channels == bn.num_features == fc.in_features):
        group = ChannelGroup(name="head", channels=head.out_channels, producer="conv_head.weight")
        for n, role in (("conv_head", "out"), ("bn2", "bn"), ("classifier", "linear_in")):
            _add_module(group, model, n, role)
        groups.append(group)
    return groups


def group_masks(groups: Sequence[ChannelGroup], keep: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Element masks for every member parameter from per-group channel keep vectors."""
    masks: dict[str, Tensor] = {}
    for g in groups:
        if g.name not in keep:
            continue
        k = keep[g.name].to(torch.bool)
        for name, dim in g.members:
            p = params[name]
            shape = [1] * p.dim()
            shape[dim] = g.channels
            m = k.to(p.device).reshape(shape).expand_as(p).clone()
            masks[name] = masks[name] & m if name in masks else m
    return masks


def channel_keep(groups: Sequence[ChannelGroup], model: nn.Module, masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Which channels of each group are alive: from masks when given, else channels whose members are not all zero."""
    params = dict(model.named_parameters())
    keep: dict[str, Tensor] = {}
    for g in groups:
        alive = torch.zeros(g.channels, dtype=torch.bool)
        for name, dim in g.members:
            t = masks[name] if masks is not None and name in masks else params[name].detach()
            alive |= (t.movedim(dim, 0).reshape(g.channels, -1) != 0).any(dim=1).cpu()
        keep[g.name] = alive
    return keep


def _slice_param(module: nn.Module, attr: str, idx: Tensor, dim: int) -> None:
    p = getattr(module, attr, None)
    if isinstance(p, nn.Parameter):
        setattr(module, attr, nn.Parameter(p.detach().index_select(dim, idx.to(p.device)).clone(), requires_grad=p.requires_grad))
    elif isinstance(p, Tensor):
        setattr(module, attr, p.index_select(dim, idx.to(p.device)).clone())


def _shrink(module: nn.Module, role: str, idx: Tensor) -> None:
    k = int(idx.numel())
    if role in ("out", "dw"):
        _slice_param(module, "weight", idx, 0)
        _slice_param(module, "bias", idx, 0)
        module.out_channels = k
        if role == "dw":
            module.in_channels = module.groups = k
    elif role == "bn":
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _slice_param(module, attr, idx, 0)
        module.num_features = k
    elif role == "in":
        _slice_param(module, "weight", idx, 1)
        module.in_channels = k
    else:
        _slice_param(module, "weight", idx, 1)
        module.in_features = k


@torch.no_grad()
def compact(model: nn.Module, groups: Sequence[ChannelGroup] | None = None, keep: Mapping[str, Tensor] | None = None,
            inplace: bool = False) -> nn.Module:
    """Physically remove pruned channels: a smaller dense model with the same outputs.

    Args:
        model: the network (MobileNetV2-style, see :func:`find_channel_groups`).
        groups: its channel groups (found when ``None``).
        keep: ``{group name: bool vector}``; default: channels whose member slices are not all zero.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The compacted model. Outputs equal the masked model's when every removed channel's member
        slices (including BN scale and shift) are zero.

    Raises:
        ConfigError: ``keep`` names an unknown group or has the wrong length.
    """
    target = model if inplace else copy.deepcopy(model)
    groups = find_channel_groups(target) if groups is None else groups
    keep = channel_keep(groups, target) if keep is None else keep
    by_name = {g.name: g for g in groups}
    for name, k in keep.items():
        if name not in by_name:
            raise ConfigError(f"compact: unknown channel group {name!r}; groups are {sorted(by_name)}.")
        g = by_name[name]
        if k.numel() != g.channels:
            raise ConfigError(f"compact: keep[{name!r}] has {k.numel()} entries, the group has {g.channels} channels.")
        idx = torch.nonzero(k.to(torch.bool).cpu()).flatten()
        if idx.numel() == 0:
            idx = torch.zeros(1, dtype=torch.long)  # one (zero) channel keeps the graph valid
        for path, role in g.modules:
            _shrink(target.get_submodule(path), role, idx)
    return target


def _round_keep(keep: Tensor, scores: Tensor, multiple: int) -> Tensor:
    """Grow ``keep`` to a multiple of ``multiple`` channels (SIMD-friendly widths), best scores first."""
    want = min(keep.numel(), -(-int(keep.sum()) // multiple) * multiple)
    order = torch.argsort(-scores.masked_fill(keep, float("inf")), stable=True)
    out = torch.zeros_like(keep)
    out[order[:want]] = True
    return out


def channel_scores(model: nn.Module, groups: Sequence[ChannelGroup], saliency: str = "l1") -> dict[str, Tensor]:
    """Per-channel saliency of each group: mean element score of its producer filter (Li et al. 2017)."""
    check_choice("saliency", saliency, ["l1", "l2"])
    params = dict(model.named_parameters())
    return {g.name: saliency_scores(params[g.producer], saliency).reshape(g.channels, -1).mean(dim=1).cpu() for g in groups}


@torch.no_grad()
def prune_channels(model: nn.Module, amount: float, saliency: str = "l1", distribution: str = "uniform", round_to: int = 1,
                   inplace: bool = False) -> nn.Module:
    """One-shot structured pruning: remove ``amount`` of every group's channels (lowest saliency) physically.

    Args:
        model: MobileNetV2-style network.
        amount: fraction of each group's channels to remove (``"uniform"``), or of all grouped
            channels (``"global"``).
        saliency: ``"l1"`` or ``"l2"`` norm of the producer filter.
        distribution: ``"uniform"`` or ``"global"``.
        round_to: keep channel counts multiples of this (8 suits AVX-512 / NEON kernels).
        inplace: modify ``model`` instead of a copy.

    Raises:
        ConfigError: bad options, or a model without recognised channel groups.
    """
    check_choice("distribution", distribution, ["uniform", "global"])
    check_int("round_to", round_to, low=1)
    check_bool("inplace", inplace)
    target = model if inplace else copy.deepcopy(model)
    groups = find_channel_groups(target)
    if not groups:
        raise ConfigError(f"prune_channels: {type(model).__name__} has no recognised channel groups (MobileNetV2-style "
                          "inverted residual blocks or conv_head/bn2/classifier); use unstructured or N:M pruning instead.")
    scores = channel_scores(target, groups, saliency)
    keep = compute_masks(scores, amount, "unstructured", distribution)
    if round_to > 1:
        keep = {k: _round_keep(v, scores[k], round_to) for k, v in keep.items()}
    return compact(target, groups, keep, inplace=True)
