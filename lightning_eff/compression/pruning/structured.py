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
* **residual-stream groups** (``streams=True``): the channels *between* blocks. A stage's first
  block produces them (``conv_pwl`` + ``bn3``, or the stem's ``conv_stem`` + ``bn1``); every
  block with a skip connection both reads them (``conv_pw`` input) and adds its own output to
  them (its ``conv_pwl`` + ``bn3`` outputs), so all of these — and the next stage's (or the
  head's) input — lose the same channel together. A residual add of two zero channels is zero,
  so a pruned stream channel stays exactly zero through the whole stage.

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
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_eff.compression.pruning.masks import compute_masks
from lightning_eff.compression.pruning.saliency import saliency_scores
from lightning_eff.errors import ConfigError
from lightning_eff.measure.counts import count_parameters  # noqa: F401  (doctest)
from lightning_eff.validation import check_bool, check_choice, check_int

__all__ = ["ChannelGroup", "find_channel_groups", "stream_groups", "compact_training", "parameter_slices", "slice_like", "group_masks", "channel_keep", "compact", "prune_channels", "channel_scores"]


@dataclass
class ChannelGroup:
    """Tensors that share one channel index and must be pruned together.

    Attributes:
        name: the owning module's path (``"blocks.1.0"``) or ``"head"``.
        channels: number of channels in the group.
        producer: the (first) conv whose output filters define the channels.
        producers: every conv writing these channels (several for a residual stream: each
            block's output is added to it); their filters are scored together for saliency.
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
    producers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.producers:
            self.producers = [self.producer]


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


def find_channel_groups(model: nn.Module, streams: bool = True) -> list[ChannelGroup]:
    """Dependency groups of MobileNetV2-style inverted residual blocks and an EfficientNet-style head.

    A block qualifies when it has ``conv_pw -> bn1 -> conv_dw (depthwise) -> bn2 -> conv_pwl``
    with matching channel counts and no squeeze-excitation in between (``se`` absent or
    ``Identity``). The head qualifies when ``conv_head``, ``bn2`` and a ``classifier`` Linear of
    matching size are children of the model. With ``streams`` the residual streams between
    blocks of a timm EfficientNet-family model (``conv_stem``/``bn1``/``blocks``) are grouped too
    (see :func:`stream_groups`); they come after the expansion groups and before the head. Other
    layers are left alone.
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
    if streams:
        groups.extend(stream_groups(model))
    head, bn, fc = (getattr(model, n, None) for n in ("conv_head", "bn2", "classifier"))
    if (isinstance(head, nn.Conv2d) and head.groups == 1 and isinstance(bn, nn.BatchNorm2d) and isinstance(fc, nn.Linear)
            and head.out_channels == bn.num_features == fc.in_features):
        group = ChannelGroup(name="head", channels=head.out_channels, producer="conv_head.weight")
        for n, role in (("conv_head", "out"), ("bn2", "bn"), ("classifier", "linear_in")):
            _add_module(group, model, n, role)
        groups.append(group)
    return groups


def _block_roles(block: nn.Module, path: str) -> tuple[list[tuple[str, str]] | None, list[tuple[str, str]]] | None:
    """``(stream-input consumers, stream-output producers)`` of one timm block, ``None`` when unknown.

    Consumers are ``None`` when the block's input side cannot be sliced (squeeze-excitation on the
    stream channels of a depthwise-separable block): the stream it reads is not prunable, the one it
    writes is.
    """
    def conv(name: str) -> bool:
        m = getattr(block, name, None)
        return isinstance(m, nn.Conv2d) and m.groups == 1

    def bn(name: str) -> bool:
        return isinstance(getattr(block, name, None), nn.BatchNorm2d)

    p = f"{path}."
    if conv("conv_pw") and bn("bn1") and conv("conv_pwl") and bn("bn3"):  # InvertedResidual (SE is internal)
        return [(p + "conv_pw", "in")], [(p + "conv_pwl", "out"), (p + "bn3", "bn")]
    if conv("conv_pw") and bn("bn1") and bn("bn2") and not hasattr(block, "conv_pwl"):  # DepthwiseSeparableConv
        dw = getattr(block, "conv_dw", None)
        producers = [(p + "conv_pw", "out"), (p + "bn2", "bn")]
        if not (isinstance(dw, nn.Conv2d) and _is_dw(dw, dw.in_channels)
                and isinstance(getattr(block, "se", nn.Identity()), nn.Identity)):
            return None, producers  # squeeze-excitation on the stream channels: that stream is not grouped
        return [(p + "conv_dw", "dw"), (p + "bn1", "bn"), (p + "conv_pw", "in")], producers
    if conv("conv") and bn("bn1") and not hasattr(block, "conv_pw"):  # ConvBnAct
        return [(p + "conv", "in")], [(p + "conv", "out"), (p + "bn1", "bn")]
    return None


def _channels_of(module: nn.Module, role: str) -> int:
    if role == "bn":
        return module.num_features
    if role == "linear_in":
        return module.in_features
    return module.in_channels if role == "in" else module.out_channels


def stream_groups(model: nn.Module) -> list[ChannelGroup]:
    """Residual-stream channel groups of a timm EfficientNet-family model (MobileNetV2/V3, EfficientNet).

    Walks ``conv_stem -> bn1 -> blocks[stage][i] -> conv_head`` once. A block whose
    ``has_skip`` is true adds its output to the stream it reads, so its producers join that
    group; any other block starts a new stream. A stream ends at the next block's input or at
    ``conv_head`` (or ``classifier`` when there is no head conv). Streams touching a layer we do
    not understand (an unknown block type, squeeze-excitation on the stream) are dropped, as is
    everything after an unknown block.
    """
    stem, bn, blocks = (getattr(model, n, None) for n in ("conv_stem", "bn1", "blocks"))
    if not (isinstance(stem, nn.Conv2d) and stem.groups == 1 and isinstance(bn, nn.BatchNorm2d) and isinstance(blocks, nn.Sequential)):
        return []
    flat = [(f"blocks.{i}.{j}", b) for i, stage in enumerate(blocks) for j, b in enumerate(stage)]
    groups: list[ChannelGroup] = []
    current: dict = {"name": "stream:stem", "modules": [("conv_stem", "out"), ("bn1", "bn")], "producers": ["conv_stem.weight"],
                     "valid": True}

    def close(consumers: list[tuple[str, str]] | None) -> None:
        if consumers is None or not current["valid"]:
            return
        mods = current["modules"] + consumers
        sizes = {_channels_of(model.get_submodule(path), role) for path, role in mods}
        if len(sizes) != 1:
            return
        group = ChannelGroup(name=current["name"], channels=sizes.pop(), producer=current["producers"][0],
                             producers=list(current["producers"]))
        for path, role in mods:
            _add_module(group, model, path, role)
        groups.append(group)

    for path, block in flat:
        roles = _block_roles(block, path)
        if roles is None:
            return groups
        consumers, producers = roles
        if getattr(block, "has_skip", False):
            current["valid"] = current["valid"] and consumers is not None
            current["modules"] += (consumers or []) + producers
            current["producers"].append(f"{producers[0][0]}.weight")
            continue
        close(consumers)
        current = {"name": f"stream:{path}", "modules": list(producers), "producers": [f"{producers[0][0]}.weight"], "valid": True}
    head, fc = getattr(model, "conv_head", None), getattr(model, "classifier", None)
    if isinstance(head, nn.Conv2d) and head.groups == 1:
        close([("conv_head", "in")])
    elif isinstance(head, (nn.Identity, type(None))) and isinstance(fc, nn.Linear):
        close([("classifier", "linear_in")])
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


def _keep_index(keep: Tensor) -> Tensor:
    idx = torch.nonzero(keep.to(torch.bool).cpu()).flatten()
    return idx if idx.numel() else torch.zeros(1, dtype=torch.long)  # one (zero) channel keeps the graph valid


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
        idx = _keep_index(k)
        for path, role in g.modules:
            _shrink(target.get_submodule(path), role, idx)
    return target


def parameter_slices(groups: Sequence[ChannelGroup], keep: Mapping[str, Tensor]) -> dict[str, list[tuple[int, Tensor]]]:
    """``{parameter name: [(dim, kept indices), ...]}``: how :func:`compact` slices each parameter."""
    by_name = {g.name: g for g in groups}
    out: dict[str, list[tuple[int, Tensor]]] = {}
    for name, k in keep.items():
        idx = _keep_index(k)
        for member, dim in by_name[name].members:
            out.setdefault(member, []).append((dim, idx))
    return out


def slice_like(tensor: Tensor, slices: Sequence[tuple[int, Tensor]]) -> Tensor:
    """Apply :func:`parameter_slices`' cuts to a tensor shaped like the parameter (a mask, a momentum buffer)."""
    for dim, idx in slices:
        tensor = tensor.index_select(dim, idx.to(tensor.device))
    return tensor.clone()


@torch.no_grad()
def compact_training(model: nn.Module, groups: Sequence[ChannelGroup], keep: Mapping[str, Tensor],
                     optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict[str, list[tuple[int, Tensor]]]:
    """Remove pruned channels from a model *while it trains*: in place, optimizers carried over.

    Every optimizer's ``param_groups`` get the new (smaller) parameters in place of the old ones
    and their per-parameter state (momentum, Adam's moments) is sliced with the same indices;
    step counters and hyper-parameters are kept. When the removed channels were masked to zero
    (weights, gradients and optimizer state), training continues exactly as the masked model
    would have, only on smaller tensors.

    Returns:
        :func:`parameter_slices` of the cut, to slice masks or other parameter-shaped tensors.
    """
    old = dict(model.named_parameters())
    compact(model, groups, keep, inplace=True)  # validates keep against the groups
    slices = parameter_slices(groups, keep)
    new = dict(model.named_parameters())
    name_of = {id(p): k for k, p in old.items()}
    for opt in optimizers:
        state: defaultdict = defaultdict(dict)
        replaced: dict[int, nn.Parameter] = {}
        for group in opt.param_groups:
            params = []
            for p in group["params"]:
                name = name_of.get(id(p))
                q = new.get(name, p) if name is not None else p
                params.append(q)
                if q is not p:
                    replaced[id(p)] = q
            group["params"] = params
        for p, st in opt.state.items():
            q = replaced.get(id(p))
            if q is None:
                state[p] = st
                continue
            cuts = slices.get(name_of[id(p)], [])
            state[q] = {k: slice_like(v, cuts) if isinstance(v, Tensor) and v.shape == p.shape else v for k, v in st.items()}
        opt.state = state
    return slices


def _round_keep(keep: Tensor, scores: Tensor, multiple: int) -> Tensor:
    """Grow ``keep`` to a multiple of ``multiple`` channels (SIMD-friendly widths), best scores first."""
    want = min(keep.numel(), -(-int(keep.sum()) // multiple) * multiple)
    order = torch.argsort(-scores.masked_fill(keep, float("inf")), stable=True)
    out = torch.zeros_like(keep)
    out[order[:want]] = True
    return out


def channel_scores(model: nn.Module, groups: Sequence[ChannelGroup], saliency: str = "l1") -> dict[str, Tensor]:
    """Per-channel saliency of each group: mean element score of its producer filters (Li et al. 2017).

    A residual stream has several producers (each block adding to it); their per-channel scores are averaged.
    """
    check_choice("saliency", saliency, ["l1", "l2"])
    params = dict(model.named_parameters())
    return {g.name: torch.stack([saliency_scores(params[p], saliency).reshape(g.channels, -1).mean(dim=1) for p in g.producers])
            .mean(dim=0).cpu() for g in groups}


@torch.no_grad()
def prune_channels(model: nn.Module, amount: float, saliency: str = "l1", distribution: str = "uniform", round_to: int = 1,
                   inplace: bool = False, streams: bool = True) -> nn.Module:
    """One-shot structured pruning: remove ``amount`` of every group's channels (lowest saliency) physically.

    Args:
        model: MobileNetV2-style network.
        amount: fraction of each group's channels to remove (``"uniform"``), or of all grouped
            channels (``"global"``).
        saliency: ``"l1"`` or ``"l2"`` norm of the producer filter.
        distribution: ``"uniform"`` or ``"global"``.
        round_to: keep channel counts multiples of this (8 suits AVX-512 / NEON kernels).
        inplace: modify ``model`` instead of a copy.
        streams: prune the residual streams between blocks too (every grouped channel is
            prunable); ``False`` prunes only the blocks' expansion channels and the head.

    Raises:
        ConfigError: bad options, or a model without recognised channel groups.
    """
    check_choice("distribution", distribution, ["uniform", "global"])
    check_int("round_to", round_to, low=1)
    check_bool("inplace", inplace)
    check_bool("streams", streams)
    target = model if inplace else copy.deepcopy(model)
    groups = find_channel_groups(target, streams=streams)
    if not groups:
        raise ConfigError(f"prune_channels: {type(model).__name__} has no recognised channel groups (MobileNetV2-style "
                          "inverted residual blocks or conv_head/bn2/classifier); use unstructured or N:M pruning instead.")
    scores = channel_scores(target, groups, saliency)
    keep = compute_masks(scores, amount, "unstructured", distribution)
    if round_to > 1:
        keep = {k: _round_keep(v, scores[k], round_to) for k, v in keep.items()}
    return compact(target, groups, keep, inplace=True)
