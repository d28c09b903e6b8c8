"""Activation (gradient) checkpointing for any network: keep block inputs, recompute the rest in backward.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": autograd normally keeps every
intermediate activation a backward pass needs; a checkpointed region keeps only its inputs and runs
its forward a second time during backward. Memory falls to the region inputs plus one region's
intermediates; the step costs about one extra forward.

:func:`apply_activation_checkpointing` wraps selected blocks in torch's non-reentrant
``checkpoint_wrapper`` (the wrapper FSDP uses; state-dict keys are unchanged) and fixes what a plain
wrapper gets wrong:

- **Stateful modules update once per step.** The recomputation re-runs BatchNorm (running mean /
  variance, ``num_batches_tracked``) and quantization observers / fake-quant ranges, which would
  update twice per step. Each region snapshots its buffers before its forward; the recomputation
  runs from that snapshot (so it reproduces the forward exactly, also for observers whose ranges
  feed the fake quantization) and the post-forward buffers are put back afterwards.
- **RNG preserved** (``preserve_rng_state=True``): dropout draws the same mask in the recomputation,
  so gradients equal the unwrapped network's.
- **Hooks**: forward hooks inside a region fire again during the recomputation;
  :func:`is_recomputing` tells a hook (e.g. distillation's feature capture) to ignore that call.
- **FX / pt2e graphs** (a QAT-prepared network has no block modules, only a flat graph of leaf
  modules): the graph is split into ``segments`` consecutive pieces (default ``√nodes``, Chen et al.'s
  rule) that share the original modules; the split runs as the graph's forward until
  :func:`remove_activation_checkpointing`, which leaves the graph untouched for conversion.

A model's own switch is used where it has one and it is safe: Hugging Face models
(``activation_checkpointing_enable``/``gradient_checkpointing_enable``) and timm models
(``set_grad_checkpointing``) — unless the model holds BatchNorm-like state, which their switches would
update twice (then the blocks are wrapped here).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()) for _ in range(3)])
    >>> info = apply_activation_checkpointing(net)
    >>> info.method, info.modules
    ('wrapper', ['0', '1', '2'])
    >>> net(torch.randn(4, 8)).sum().backward()
    >>> int(net[0][1].num_batches_tracked)  # once, not twice
    1
    >>> _ = remove_activation_checkpointing(net)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lightning_eff.errors import ConfigError, NoEffectWarning
from lightning_eff.naming import canonical_name, unwrap_model
from lightning_eff.surgery import ModuleSelector, get_submodule, set_submodule
from lightning_eff.validation import check_bool, check_choice, renamed_option

__all__ = [
    "CheckpointingInfo",
    "MODEL_SWITCH_CHOICES",
    "apply_activation_checkpointing",
    "auto_blocks",
    "check_memory_budget",
    "check_segments",
    "choose_blocks",
    "profile_blocks",
    "is_recomputing",
    "remove_activation_checkpointing",
]

MODEL_SWITCH_CHOICES = ("auto", "always", "never")
_SPLIT_ATTR = "_lightning_eff_ckpt_split"
_INFO_ATTR = "_lightning_eff_ckpt_info"
_STATEFUL_TYPES = ("_BatchNorm", "_InstanceNorm", "ObserverBase", "FakeQuantizeBase")


def check_memory_budget(memory_budget: Any) -> float | None:
    """``None`` or a fraction in (0, 1]; else a :class:`~lightning_eff.errors.ConfigError`."""
    if memory_budget is None:
        return None
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not 0 < memory_budget <= 1:
        raise ConfigError(f"memory_budget={memory_budget!r} must be a fraction in (0, 1] (the share of saved activations "
                          "to keep) or None (checkpoint every selected block).")
    return float(memory_budget)


def check_segments(segments: Any) -> int | None:
    """``None`` or an integer >= 2 (the pieces an FX graph is cut into); else a :class:`~lightning_eff.errors.ConfigError`."""
    if segments is not None and (isinstance(segments, bool) or not isinstance(segments, int) or segments < 2):
        raise ConfigError(f"segments={segments!r} must be an integer >= 2 (or None for the square root of the graph's nodes).")
    return segments


def is_recomputing() -> bool:
    """Whether the current forward call is a checkpoint's recomputation (it runs inside a backward pass).

    Non-reentrant checkpointing re-runs a region's forward while autograd executes the backward
    graph; a forward hook that records features (distillation) or counts calls can skip those calls.
    """
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover - very old torch
        return False


@dataclasses.dataclass
class CheckpointingInfo:
    """What :func:`apply_activation_checkpointing` did: ``method`` (``"wrapper"``, ``"timm"``, ``"transformers"``,
    ``"fx-segments"``), the canonical names of the checkpointed modules (or the graph segments)."""

    method: str
    modules: list[str]
    segments: int = 0
    profile: dict[str, Any] | None = None  #: :func:`profile_blocks` when a ``memory_budget`` chose the blocks

    def summary(self) -> str:  # noqa: D102
        what = f"{self.segments} graph segments" if self.segments else f"{len(self.modules)} modules"
        return f"activation checkpointing ({self.method}): {what}"


def _is_stateful(module: nn.Module) -> bool:
    return any(cls.__name__ in _STATEFUL_TYPES for cls in type(module).__mro__)


def _composite(module: nn.Module) -> bool:
    return any(True for _ in module.children()) and any(True for _ in module.parameters())


def auto_blocks(net: nn.Module) -> list[str]:
    """The block list of a network: the children of its longest list of composite blocks.

    Transformer layers (``encoder.layer.N``), timm ``blocks``/``stages``, torchvision ``features.N``, a
    user's ``nn.Sequential`` of blocks. Containers (``nn.Sequential``/``nn.ModuleList``) are ranked by how
    many children hold both submodules and parameters (leaf layers like a lone ``Conv2d`` do not count:
    checkpointing one saves nothing); the longest wins (the outermost on a tie). A list of one block, or
    a network without any, gives ``[]``.
    """
    best: tuple[int, list[str]] = (1, [])
    for name, module in net.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        blocks = [f"{name}.{child}" if name else child for child, sub in module.named_children() if _composite(sub)]
        if len(blocks) > best[0]:
            best = (len(blocks), blocks)
    return best[1]


def _outermost(names: Sequence[str]) -> list[str]:
    chosen: list[str] = []
    for name in sorted(names, key=lambda n: (n.count("."), n)):
        if not any(name == c or name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


class _BufferGuard:
    """Run a region's recomputation from the buffers it had before its forward; put the newer ones back after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def _buffers(self) -> list[torch.Tensor]:
        return [b for b in self.module.buffers() if b is not None]

    def __call__(self) -> tuple[Any, Any]:
        if not any(_is_stateful(m) for m in self.module.modules()):
            return contextlib.nullcontext(), contextlib.nullcontext()
        before: list[torch.Tensor] = []

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            before.extend(b.detach().clone() for b in self._buffers())
            yield

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            buffers = self._buffers()
            after = [b.detach().clone() for b in buffers]
            _load(buffers, before)
            try:
                yield
            finally:
                _load(buffers, after)

        return forward(), recompute()


def _load(buffers: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buf, value in zip(buffers, values):
            if buf.shape != value.shape:  # an observer's range goes from shape [0] to [C] on its first call
                buf.resize_(value.shape)
            buf.copy_(value)


def _wrap(module: nn.Module, preserve_rng_state: bool, reentrant: bool = False) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    if reentrant:
        return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.REENTRANT, preserve_rng_state=preserve_rng_state)
    return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                              context_fn=_BufferGuard(module), preserve_rng_state=preserve_rng_state,
                              determinism_check="none")


def _is_wrapped(module: nn.Module) -> bool:
    return type(module).__name__ == "CheckpointWrapper"


def _switch_kind(module: nn.Module) -> str | None:
    if getattr(module, "supports_gradient_checkpointing", False) and (
            hasattr(module, "activation_checkpointing_enable") or hasattr(module, "gradient_checkpointing_enable")):
        return "transformers"
    if callable(getattr(module, "set_grad_checkpointing", None)) and type(module).__module__.startswith("timm."):
        return "timm"
    return None


def _model_switch(net: nn.Module) -> tuple[str, nn.Module] | None:
    """``(kind, module)``: the outermost module of ``net`` with its library's own checkpointing switch
    (``"transformers"`` or ``"timm"``) — the network itself, or the model a user's wrapper holds."""
    for _, module in net.named_modules():
        kind = _switch_kind(module)
        if kind is not None:
            return kind, module
    return None


def _enable_switch(net: nn.Module, kind: str, preserve_rng_state: bool) -> None:
    if kind == "transformers":
        kwargs = {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}
        if getattr(getattr(net, "config", None), "use_cache", False):
            net.config.use_cache = False  # a key/value cache cannot be recomputed (transformers would say so per call)
        if hasattr(net, "activation_checkpointing_enable"):
            net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        from timm.layers import use_reentrant_ckpt

        if use_reentrant_ckpt():
            raise ConfigError("use_model_switch='always': timm is set to reentrant checkpoints "
                              "(timm.layers.set_reentrant_ckpt(True)); set it back or use use_model_switch='never'.")
        net.set_grad_checkpointing(True)


def _segment_graph(gm: torch.fx.GraphModule, segments: int | None, preserve_rng_state: bool) -> int:
    from torch.fx.passes.split_module import split_module

    nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    if len(nodes) < 2:
        return 0
    k = segments or max(2, round(math.sqrt(len(nodes))))
    k = min(k, len(nodes))
    index = {n: i * k // len(nodes) for i, n in enumerate(nodes)}
    last = [0]

    def partition(node: torch.fx.Node) -> int:
        last[0] = index.get(node, last[0])
        return last[0]

    split = split_module(gm, gm, partition, keep_original_order=True)
    for name, child in list(split.named_children()):
        if name.startswith("submod_"):
            setattr(split, name, _wrap(child, preserve_rng_state))
    object.__setattr__(gm, _SPLIT_ATTR, split)
    gm.__dict__["forward"] = split.forward  # the instance attribute shadows GraphModule's generated forward
    return sum(1 for n, _ in split.named_children() if n.startswith("submod_"))


def _tensor_bytes(values: Any) -> int:
    if isinstance(values, torch.Tensor):
        return values.numel() * values.element_size()
    if isinstance(values, (list, tuple)):
        return sum(_tensor_bytes(v) for v in values)
    if isinstance(values, dict):
        return sum(_tensor_bytes(v) for v in values.values())
    return 0


def _finer(net: nn.Module, names: Sequence[str]) -> list[str]:
    """Each block replaced by its composite children (one level down) when it has two or more.

    A budget is met with less recomputation when the candidates are finer: a transformer layer becomes
    its attention / feed-forward parts (the feed-forward intermediate is most of the memory and little of
    the time), a CNN stage its blocks.
    """
    out: list[str] = []
    for name in names:
        children = [f"{name}.{c}" for c, m in get_submodule(net, name, option="modules").named_children() if _composite(m)]
        out.extend(children if len(children) >= 2 else [name])
    return out


def profile_blocks(net: nn.Module, names: Sequence[str], example_inputs: Any, repeats: int = 3) -> dict[str, Any]:
    """Per block: bytes it saves for backward, bytes of its inputs (what a checkpoint keeps), forward time.

    Runs ``repeats`` training-mode forwards of ``net`` on ``example_inputs`` with a
    :class:`~lightning_eff.measure.SavedTensorCounter` around each block; buffers (BatchNorm statistics)
    and the RNG are restored afterwards, so profiling leaves no trace.

    Returns:
        ``{"blocks": {name: {"saved": bytes, "inputs": bytes, "ms": min forward ms}}, "total_saved": bytes}``.
    """
    import time

    from lightning_eff.batch import call_with_inputs
    from lightning_eff.measure import SavedTensorCounter

    stats: dict[str, dict[str, float]] = {n: {"saved": 0.0, "inputs": 0.0, "ms": float("inf")} for n in names}
    counters: dict[str, tuple[SavedTensorCounter, float]] = {}
    handles = []
    for name in names:
        module = get_submodule(net, name, option="modules")

        def pre(mod, args, kwargs, name=name):
            stats[name]["inputs"] = float(_tensor_bytes(args) + _tensor_bytes(kwargs))
            counter = SavedTensorCounter(exclude=mod).__enter__()
            counters[name] = (counter, time.perf_counter())

        def post(mod, args, kwargs, output, name=name):
            counter, start = counters.pop(name)
            counter.__exit__(None, None, None)
            stats[name]["ms"] = min(stats[name]["ms"], 1e3 * (time.perf_counter() - start))
            stats[name]["saved"] = float(counter.saved_bytes)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    buffers = [b.detach().clone() for b in net.buffers()]
    rng = torch.get_rng_state()
    was_training = net.training
    outside = 0
    try:
        net.train()
        with torch.enable_grad():
            for _ in range(repeats):
                outer = SavedTensorCounter(exclude=net)
                with outer:
                    call_with_inputs(net, example_inputs)
                outside = outer.saved_bytes
    finally:
        for h in handles:
            h.remove()
        _load(list(net.buffers()), buffers)
        torch.set_rng_state(rng)
        net.train(was_training)
    total = outside + sum(v["saved"] for v in stats.values())
    return {"blocks": stats, "total_saved": float(total)}


def choose_blocks(profile: dict[str, Any], memory_budget: float, resolution: int = 400) -> list[str]:
    """The blocks to checkpoint so the estimated saved activations fall to ``memory_budget`` of the total.

    The least recomputation that frees enough memory: a 0/1 knapsack over the candidate blocks, each
    freeing what it saves minus the inputs a checkpoint keeps, at the cost of its forward time (memory
    counted in ``1/resolution`` of what must be freed, the exact bytes kept beside each entry, so the
    chosen set always frees enough and is the cheapest up to that rounding). Cheap, high-resolution blocks of a CNN are the usual picks, compute-heavy late blocks the
    last. All blocks with a gain if no choice meets the budget; none if the total is within it already.
    """
    blocks = profile["blocks"]
    need = profile["total_saved"] - memory_budget * profile["total_saved"]
    gain = {n: b["saved"] - b["inputs"] for n, b in blocks.items()}
    names = [n for n in blocks if gain[n] > 0]
    if need <= 0 or not names:
        return []
    if sum(gain[n] for n in names) < need:
        return names
    unit = need / resolution
    # best[g] = (least ms, exact bytes freed, blocks) among the sets whose rounded-down units sum to g
    # (capped at resolution); each block loses less than one unit to the rounding, so a set that truly
    # frees `need` sits at g >= resolution - len(names): the cheapest of those that does is the answer
    best: list[tuple[float, float, tuple[str, ...]] | None] = [None] * (resolution + 1)
    best[0] = (0.0, 0.0, ())
    for name in names:
        units, ms = int(gain[name] // unit), max(float(blocks[name]["ms"]), 1e-6)
        for g in range(resolution, -1, -1):  # each block at most once: walk the table downwards
            if best[g] is None:
                continue
            to = min(resolution, g + units)
            cost, freed, chosen = best[g]
            if best[to] is None or cost + ms < best[to][0]:
                best[to] = (cost + ms, freed + gain[name], (*chosen, name))
    feasible = [e for e in best[max(0, resolution - len(names)):] if e is not None and e[1] >= need * (1 - 1e-12)]
    if not feasible:
        return names
    picked = set(min(feasible, key=lambda e: e[0])[2])
    return [n for n in blocks if n in picked]  # in network order


def apply_activation_checkpointing(
    net: nn.Module,
    include: str | Sequence[str] | None = None,
    module_types: Sequence[Any] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    use_model_switch: str = "auto",
    segments: int | None = None,
    preserve_rng_state: bool = True,
    reentrant: bool = False,
    memory_budget: float | None = None,
    example_inputs: Any = None,
    modules: str | Sequence[str] | None = None,
) -> CheckpointingInfo:
    """Checkpoint the selected blocks of ``net`` in place (non-reentrant ``torch.utils.checkpoint``).

    Args:
        net: the network (a ``torch.compile``/DDP wrapper is looked through).
        include: ``"auto"`` (the default, :func:`auto_blocks`: transformer layers, timm blocks/stages, ...) or
            regexes over canonical module names (``["blocks\\\\.\\\\d+"]``); nested matches keep the outermost.
            ``include``/``exclude``/``module_types`` are the selection options of every technique
            (:class:`~lightning_eff.surgery.ModuleSelector`); ``modules`` is the old name of ``include``.
        module_types: class names (or classes) to checkpoint, alone or with ``include`` regexes.
        exclude: regexes of module names never checkpointed (nor anything inside them).
        use_model_switch: ``"auto"`` uses a Hugging Face / timm model's own switch unless the model has
            BatchNorm-like state (their switches would update it twice); ``"always"`` / ``"never"``.
        segments: for an FX/pt2e graph (QAT-prepared networks): how many pieces (default ``√nodes``).
        preserve_rng_state: restore the RNG for the recomputation (identical dropout masks).
        reentrant: torch's older reentrant checkpoint (block wrappers only). It cannot restore buffers
            around the recomputation, so it is refused for networks with BatchNorm/observer state, and
            it gives no gradients to a region whose inputs do not require grad. Prefer the default.
        memory_budget: checkpoint only as many blocks as it takes to bring the activations saved for
            backward to this fraction of the unwrapped network's (:func:`profile_blocks` on
            ``example_inputs``, :func:`choose_blocks`): less recomputation than checkpointing every block.
            ``None`` checkpoints every selected block.
        example_inputs: a training batch's inputs (needed with ``memory_budget``).

    Returns:
        :class:`CheckpointingInfo` (what was checkpointed, and how).

    Raises:
        ConfigError: a bad option, or ``use_model_switch="always"`` on a model without one.
    """
    check_choice("use_model_switch", use_model_switch, MODEL_SWITCH_CHOICES)
    check_bool("preserve_rng_state", preserve_rng_state)
    check_bool("reentrant", reentrant)
    check_memory_budget(memory_budget)
    if memory_budget is not None and example_inputs is None:
        raise ConfigError("memory_budget needs example_inputs (a training batch's inputs) to profile the blocks.")
    check_segments(segments)
    modules = renamed_option("include", include, "apply_activation_checkpointing", modules=modules)
    modules = "auto" if modules is None else modules
    auto = modules == "auto" and module_types is None
    if modules == "auto":
        modules = None
    elif isinstance(modules, str):
        modules = [modules]
    net = unwrap_model(net)
    found = _model_switch(net)
    kind, owner = found if found is not None else (None, None)
    if use_model_switch == "always" and kind is None:
        raise ConfigError(f"use_model_switch='always': {type(net).__name__} has no checkpointing switch of its own "
                          "(Hugging Face activation_checkpointing_enable / timm set_grad_checkpointing); use 'auto'.")
    stateful = any(_is_stateful(m) for m in net.modules())
    if use_model_switch == "always" and memory_budget is not None:
        raise ConfigError("use_model_switch='always' cannot follow a memory_budget (a model's switch checkpoints every layer).")
    if use_model_switch == "always" and stateful:
        raise ConfigError(f"use_model_switch='always': {type(owner).__name__}'s own checkpointing would update its "
                          "BatchNorm/observer state twice per step; use 'auto' (blocks wrapped here, state updated once).")
    if reentrant and stateful:
        raise ConfigError("reentrant=True cannot restore BatchNorm/observer state around the recomputation (it would "
                          "update twice per step); use reentrant=False (the default).")
    if reentrant and (use_model_switch == "always" or isinstance(net, torch.fx.GraphModule)):
        raise ConfigError("reentrant=True applies to block wrappers only (not to a model's own switch or an FX graph).")
    own_switch = use_model_switch == "always" or (use_model_switch == "auto" and not stateful and memory_budget is None
                                                  and exclude is None)  # a switch can neither skip blocks nor pick them
    if auto and kind is not None and not reentrant and own_switch:  # a switch cannot pick blocks for a budget
        _enable_switch(owner, kind, preserve_rng_state)
        owner_name = next(n for n, m in net.named_modules() if m is owner)
        info = CheckpointingInfo(method=kind, modules=[canonical_name(owner_name)])
    elif auto and isinstance(net, torch.fx.GraphModule) and not auto_blocks(net):
        if memory_budget is not None or exclude is not None:
            warnings.warn("activation checkpointing: an FX/pt2e graph is cut into segments; memory_budget and exclude "
                          "apply to block lists and are ignored here (set segments= to trade memory for time).",
                          NoEffectWarning, stacklevel=2)
        count = _segment_graph(net, segments, preserve_rng_state)
        info = CheckpointingInfo(method="fx-segments", modules=[f"submod_{i}" for i in range(count)], segments=count)
    else:
        if auto:
            names = auto_blocks(net)
        else:
            selector = ModuleSelector(include=modules, exclude=exclude, types=module_types)
            names = [canonical_name(n) for n, _ in selector.select(net) if n]
        excluded = ModuleSelector(exclude=exclude)  # a module excluded: its submodules too
        names = _outermost([n for n in names
                            if all(excluded.name_selected(".".join(n.split(".")[:i])) for i in range(1, n.count(".") + 2))])
        profile = None
        if memory_budget is not None and names:
            names = _finer(net, names)
            profile = profile_blocks(net, names, example_inputs)
            names = choose_blocks(profile, memory_budget)
        for name in names:
            module = get_submodule(net, name, option="modules")
            if not _is_wrapped(module):
                set_submodule(net, name, _wrap(module, preserve_rng_state, reentrant), option="modules")
        info = CheckpointingInfo(method="wrapper", modules=names, profile=profile)
    if not info.modules:
        warnings.warn(f"activation checkpointing: nothing selected in {type(net).__name__} (modules={modules or 'auto'!r}, "
                      f"module_types={module_types!r}); no block list was found — name the blocks with modules=[regex] "
                      "or module_types=[class name].", NoEffectWarning, stacklevel=2)
    net.__dict__.setdefault(_INFO_ATTR, []).append(info)
    return info


def remove_activation_checkpointing(net: nn.Module) -> nn.Module:
    """Undo :func:`apply_activation_checkpointing` in place (wrappers, the graph split, a model's switch)."""
    net = unwrap_model(net)
    if net.__dict__.pop(_SPLIT_ATTR, None) is not None:
        net.__dict__.pop("forward", None)
    for info in net.__dict__.pop(_INFO_ATTR, []):
        if info.method in ("transformers", "timm"):
            owner = get_submodule(net, info.modules[0], option="modules") if info.modules[0] else net
            if info.method == "transformers":
                (getattr(owner, "activation_checkpointing_disable", None) or owner.gradient_checkpointing_disable)()
            else:
                owner.set_grad_checkpointing(False)
    for name, module in list(net.named_modules()):
        if _is_wrapped(module):
            set_submodule(net, canonical_name(name), module._checkpoint_wrapped_module, option="modules")
    return net

