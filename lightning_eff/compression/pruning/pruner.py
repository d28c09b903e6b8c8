"""The pruning engine for any training loop: schedule, masks, gradient masking, regrowth, rewinding.

:class:`Pruner` holds its masks itself, beside plain ``nn.Parameter`` s (no
``torch.nn.utils.prune`` reparametrization), and refers to parameters *by name*. That is what
lets it survive model surgery: QAT's FX ``prepare`` copies every module (fused ``ConvBnReLU2d``
keeps the conv's ``weight`` name), so after :meth:`attach` is called again on the prepared model
the same masks act on the new tensors and the converted int8 weights keep the zeros.

Use in a plain loop::

    pruner = Pruner(PruningConfig(amount=0.8, schedule="polynomial", frequency=10))
    pruner.attach(model, total_steps=1000)
    for step, (x, y) in enumerate(loader):
        pruner.on_step_start(step, [opt])       # mask update when the schedule says so
        loss_fn(model(x), y).backward()
        pruner.before_optimizer_step(step)      # gradient statistics, regrowth, gradient masking
        opt.step(); opt.zero_grad()
        pruner.after_optimizer_step()           # pruned weights exactly zero again

With ``broadcast`` (a function returning rank 0's copy of an object) every rank adopts rank 0's
masks, so DDP ranks never disagree even when ties or non-deterministic kernels would make them.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_eff.compression.pruning.config import PruningConfig
from lightning_eff.compression.pruning.masks import compute_masks, mask_sparsity
from lightning_eff.compression.pruning.regrowth import drop_fraction, regrow
from lightning_eff.compression.pruning.saliency import (
    GRADIENT_SALIENCIES,
    GradientStats,
    saliency_scores,
)
from lightning_eff.compression.pruning.selection import select_parameters
from lightning_eff.compression.pruning.structured import (
    ChannelGroup,
    find_channel_groups,
    group_masks,
)
from lightning_eff.errors import ConfigError
from lightning_eff.naming import canonical_name, remap_keys

__all__ = ["Pruner"]

Broadcast = Callable[[Any], Any]
_STATE_VERSION = 1


class Pruner:
    """Schedule-driven masks over the selected parameters of one model.

    Args:
        config: the validated options.

    Attributes:
        masks: ``{parameter name: bool tensor}`` (``True`` = kept), on the parameters' devices.
        sparsity: the schedule target the current masks were computed for.
    """

    def __init__(self, config: PruningConfig) -> None:
        self.config = config
        self.masks: dict[str, Tensor] = {}
        self.sparsity = 0.0
        self.stats = GradientStats(config.saliency) if config.saliency in GRADIENT_SALIENCIES else None
        self.rewind_state: dict[str, Tensor] | None = None
        self.params: dict[str, nn.Parameter] = {}
        self.units: dict[str, ChannelGroup | None] = {}
        self.model: nn.Module | None = None
        self.begin, self.end, self.regrow_end = 0, 1, 1
        self._fmasks: list[Tensor] = []
        self._mparams: list[Tensor] = []

    # ---------------------------------------------------------------- binding
    def attach(self, model: nn.Module, total_steps: float | None = None) -> dict[str, nn.Parameter]:
        """Select the parameters of ``model`` (again after surgery) and bind existing masks to them.

        Returns:
            The selected ``{name: parameter}``.

        Raises:
            ConfigError: masks (e.g. from a checkpoint) name parameters ``model`` lacks, or
                channel granularity on a model whose groups are not found.
        """
        c = self.config
        selected = self.validate(model)
        named = dict(model.named_parameters())
        self.units = {name: None for name in selected}
        params = dict(selected)
        if c.granularity == "channel":
            producers = {p: g for g in find_channel_groups(model) for p in g.producers}
            for name in selected:
                group = producers.get(name)
                self.units[name] = group
                if group is not None:
                    for member, _ in group.members:
                        params[member] = named[member]
        # masks / rewind weights saved from the same network under a wrapper (torch.compile, checkpoint
        # wrappers, DDP) or without one bind by canonical name
        self.masks = remap_keys(self.masks, named)
        if self.rewind_state is not None:
            self.rewind_state = remap_keys(self.rewind_state, named)
        missing = [k for k in self.masks if k not in named]
        if missing:
            raise ConfigError(
                f"pruning masks name parameters this model does not have: {missing[:5]} (the checkpoint was "
                f"pruned with a different model or selection). Prunable parameters: {list(selected)[:8]}..."
            )
        for k in self.masks:
            params.setdefault(k, named[k])
        self.params = params
        self.model = model
        self.masks = {k: m.to(device=params[k].device, dtype=torch.bool) for k, m in self.masks.items()}
        if self.rewind_state is not None:
            self.rewind_state = {k: v.to(named[k].device) for k, v in self.rewind_state.items() if k in named}
        self.begin, self.end = c.steps(total_steps)
        if c.regrowth is not None:
            self.regrow_end = c.regrowth_end(total_steps, self.end)
        self._refresh()
        return selected

    def validate(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Run the selectors on ``model`` without binding: errors and warnings before training starts."""
        c = self.config
        return select_parameters(model, c.include, c.exclude, c.module_types, c.parameter_names, c.min_params, c.skip_first)

    def _refresh(self) -> None:
        names = [k for k in self.masks if k in self.params]
        self._mparams = [self.params[k] for k in names]
        self._fmasks = [self.masks[k].to(self.params[k].dtype) for k in names]

    # ---------------------------------------------------------------- schedule
    def target(self, step: int) -> float:
        """Schedule target at ``step``."""
        return self.config.target(step, self.begin, self.end)

    def on_step_start(self, step: int, optimizers: Iterable[torch.optim.Optimizer] = (), broadcast: Broadcast | None = None) -> bool:
        """Snapshot for rewinding and update the masks when the schedule asks for more sparsity.

        Returns:
            True when the masks changed.
        """
        c = self.config
        if c.rewind_step is not None and step == c.rewind_step and self.rewind_state is None:
            self.rewind_state = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        target = self.target(step)
        if target <= self.sparsity + 1e-12 or (c.granularity == "nm" and self.masks):
            return False
        if self.stats is not None and self.stats.count == 0:
            return False  # gradient saliency: wait until one backward pass has been seen
        self.update(target, optimizers, broadcast)
        if self.rewind_state is not None and step > c.rewind_step:
            self.rewind()
        return True

    @torch.no_grad()
    def _scores(self) -> dict[str, Tensor]:
        scores = {}
        for name in self.units:
            p = self.params[name]
            if self.stats is None:
                scores[name] = saliency_scores(p, self.config.saliency)
            elif self.stats.mean(name) is None:
                scores[name] = torch.zeros_like(p, dtype=torch.float32)  # no gradient: contributes nothing
            else:
                scores[name] = self.stats.scores(name, p)
        return scores

    @torch.no_grad()
    def compute(self, sparsity: float) -> dict[str, Tensor]:
        """Masks for ``sparsity`` from the current weights (and statistics), keeping earlier prunes."""
        c = self.config
        scores = self._scores()
        if c.granularity != "channel":
            return compute_masks(scores, sparsity, c.granularity, c.distribution, n=c.n, m=c.m, block=c.block,
                                 previous=self.masks or None, allow_full=c.allow_full)
        # one row of channel scores per unit: a lone layer's filters, or a group's channels (a residual
        # stream has several selected producers: their filter scores are averaged)
        groups = {u.name: u for u in self.units.values() if u is not None}
        key = {k: (u.name if u is not None else k) for k, u in self.units.items()}
        parts: dict[str, list[Tensor]] = {}
        for k, s in scores.items():
            parts.setdefault(key[k], []).append(s.reshape(s.shape[0], -1).mean(dim=1))
        rows = {u: torch.stack(v).mean(dim=0) for u, v in parts.items()}
        prev = {}
        for k, u in key.items():
            if k in self.masks and u not in prev:
                m = self.masks[k]
                prev[u] = m.reshape(m.shape[0], -1).any(dim=1)
        keep = compute_masks(rows, sparsity, "unstructured", c.distribution, previous=prev or None, allow_full=c.allow_full)
        masks = group_masks(list(groups.values()), {u: v for u, v in keep.items() if u in groups}, self.params)
        for k, u in key.items():
            if u not in groups:
                p = self.params[k]
                masks[k] = keep[k].reshape([-1] + [1] * (p.dim() - 1)).expand_as(p).clone()
        return masks

    @torch.no_grad()
    def update(self, sparsity: float, optimizers: Iterable[torch.optim.Optimizer] = (), broadcast: Broadcast | None = None) -> None:
        """Compute masks for ``sparsity``, agree on rank 0's, zero optimizer state and weights."""
        masks = self.compute(sparsity)
        self.set_masks(masks, optimizers, broadcast)
        self.sparsity = float(sparsity)
        if self.stats is not None:
            self.stats.reset()

    @torch.no_grad()
    def set_masks(self, masks: Mapping[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = (), broadcast: Broadcast | None = None) -> None:
        """Adopt ``masks`` (rank 0's when ``broadcast`` is given) and zero what they prune."""
        if broadcast is not None:
            masks = broadcast({k: v.cpu() for k, v in masks.items()})
        self.masks = {k: v.to(self.params[k].device, torch.bool) for k, v in masks.items()}
        self._refresh()
        zero_optimizer_state(optimizers, self.params, self.masks)
        self.after_optimizer_step()

    @torch.no_grad()
    def rewind(self) -> None:
        """Lottery-ticket rewinding (Frankle et al. 2019/2020): weights back to the snapshot, masks kept."""
        if self.rewind_state is None or self.model is None:
            return
        for k, p in self.model.named_parameters():
            if k in self.rewind_state and self.rewind_state[k].shape == p.shape:
                p.copy_(self.rewind_state[k])
        self.after_optimizer_step()

    # ---------------------------------------------------------------- every step
    @torch.no_grad()
    def before_optimizer_step(self, step: int, optimizers: Iterable[torch.optim.Optimizer] = (), broadcast: Broadcast | None = None) -> None:
        """After backward, before the step: collect gradient statistics, regrow, mask gradients."""
        if self.stats is not None:
            self.stats.update({k: self.params[k] for k in self.units})
        c = self.config
        if (c.regrowth is not None and self.masks and step > self.begin and (step - self.begin) % c.regrowth_interval == 0
                and step < self.regrow_end):
            fraction = drop_fraction(step, c.regrowth_fraction, self.begin, self.regrow_end)
            grads = {k: self.params[k].grad for k in self.masks}
            new = regrow(c.regrowth, dict(self.params), dict(self.masks), fraction, step, grads, c.seed)
            self.set_masks(new, optimizers, broadcast)
        grads = [p.grad for p in self._mparams]
        if grads and all(g is not None for g in grads):
            torch._foreach_mul_(grads, self._fmasks)
        else:
            for p, m in zip(self._mparams, self._fmasks):
                if p.grad is not None:
                    p.grad.mul_(m)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Zero the pruned weights again (weight decay, Adam's epsilon, or any update that moved them)."""
        if self._mparams:
            torch._foreach_mul_(self._mparams, self._fmasks)

    # ---------------------------------------------------------------- reporting / state
    def layer_sparsity(self) -> tuple[dict[str, float], float]:
        """Per-parameter and global sparsity of the masks (0 before the first update)."""
        return mask_sparsity(self.masks)

    def state_dict(self) -> dict[str, Any]:
        """Masks, target, statistics and rewind weights as plain CPU tensors (``weights_only``-loadable).

        Keys are canonical parameter names (no ``_orig_mod.`` / ``_checkpoint_wrapped_module.`` / ``module.``),
        so the state binds to the same network with or without those wrappers.
        """
        return {
            "version": _STATE_VERSION,
            "sparsity": float(self.sparsity),
            "masks": {canonical_name(k): v.detach().cpu().clone() for k, v in self.masks.items()},
            "stats": None if self.stats is None else self.stats.state_dict(),
            "rewind": None if self.rewind_state is None else {canonical_name(k): v.detach().cpu().clone() for k, v in self.rewind_state.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; masks bind to parameters at the next :meth:`attach`."""
        self.sparsity = float(state.get("sparsity", 0.0))
        self.masks = {k: v.to(torch.bool) for k, v in (state.get("masks") or {}).items()}
        if self.stats is not None and state.get("stats"):
            self.stats.load_state_dict(state["stats"])
        self.rewind_state = None if state.get("rewind") is None else dict(state["rewind"])
        if self.params:
            self.masks = remap_keys(self.masks, self.params)
            missing = [k for k in self.masks if k not in self.params]
            if not missing:
                self.masks = {k: v.to(self.params[k].device) for k, v in self.masks.items()}
                self._refresh()


@torch.no_grad()
def zero_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Zero momentum / Adam moments of pruned entries so they never push a pruned weight again."""
    by_id = {id(params[k]): m for k, m in masks.items() if k in params}
    for opt in optimizers:
        for p, state in opt.state.items():
            m = by_id.get(id(p))
            if m is None:
                continue
            for v in state.values():
                if isinstance(v, Tensor) and v.shape == m.shape:
                    v.mul_(m.to(v.dtype))
