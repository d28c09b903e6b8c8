"""Pruning (survey §3.1.1): functional core usable in any training loop.

* :mod:`selection` — which parameters (module-name regexes, module types, thin-layer skips);
* :mod:`saliency` — magnitude L1/L2, first-order Taylor, OBD with the Fisher diagonal;
* :mod:`masks` — granularity (unstructured, N:M, blocks, channels) and :mod:`distribution`
  (global, uniform, ERK);
* :mod:`regrowth` — RigL / SET at fixed sparsity;
* :mod:`structured` — coupled channel groups and physical channel removal;
* :mod:`sparse_format` — the compressed bitmask artifact and its loader;
* :mod:`speed` — whether the zeros bought latency (timed against the same model with the zeros filled in);
* :class:`PruningConfig` + :class:`Pruner` — the schedule-driven engine the ``Pruning`` callback drives.

Example (one-shot global magnitude pruning, no Trainer)::

    masks = prune(model, amount=0.8)                 # 80% of conv/linear weights are now zero
    small = prune_channels(mobilenet, amount=0.5)    # half the expansion channels, physically removed
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_eff.compression.pruning.config import SCHEDULES, PruningConfig
from lightning_eff.compression.pruning.distribution import (
    DISTRIBUTIONS,
    erk_densities,
    layer_sparsities,
)
from lightning_eff.compression.pruning.masks import (
    GRANULARITIES,
    apply_masks,
    compute_masks,
    mask_gradients,
    mask_sparsity,
    nm_mask,
)
from lightning_eff.compression.pruning.pruner import Pruner, zero_optimizer_state
from lightning_eff.compression.pruning.regrowth import (
    REGROWTH,
    drop_fraction,
    regrow,
    rigl_update,
    set_update,
)
from lightning_eff.compression.pruning.saliency import (
    SALIENCIES,
    GradientStats,
    saliency_scores,
)
from lightning_eff.compression.pruning.selection import get_parameter, select_parameters
from lightning_eff.compression.pruning.sparse_format import (
    load_sparse,
    load_sparse_state_dict,
    save_sparse,
    sparse_state_dict,
)
from lightning_eff.compression.pruning.speed import (
    densify,
    sparsity_latency,
    weight_zero_fraction,
)
from lightning_eff.compression.pruning.structured import (
    ChannelGroup,
    compact,
    compact_training,
    find_channel_groups,
    prune_channels,
    stream_groups,
)

__all__ = [
    "DISTRIBUTIONS", "GRANULARITIES", "REGROWTH", "SALIENCIES", "SCHEDULES",
    "ChannelGroup", "GradientStats", "Pruner", "PruningConfig",
    "apply_masks", "compact", "compact_training", "compute_masks", "drop_fraction", "erk_densities", "find_channel_groups", "get_parameter",
    "layer_sparsities", "load_sparse", "load_sparse_state_dict", "mask_gradients", "mask_sparsity", "nm_mask", "prune",
    "prune_channels", "regrow", "rigl_update", "save_sparse", "saliency_scores", "select_parameters", "set_update",
    "densify", "sparse_state_dict", "sparsity_latency", "stream_groups", "weight_zero_fraction", "zero_optimizer_state",
]


def prune(
    model: nn.Module,
    amount: float,
    saliency: str = "l1",
    granularity: str = "unstructured",
    distribution: str = "global",
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    **options,
) -> dict[str, Tensor]:
    """One-shot pruning of ``model`` in place; returns the masks (``{parameter name: bool}``).

    Any further :class:`PruningConfig` option (``n``, ``m``, ``block``, ``module_types``,
    ``min_params``, ``skip_first``, ``allow_full``) may be passed. Gradient saliencies
    (``"taylor"``, ``"obd"``) need a :class:`Pruner` fed with gradients instead.

    Raises:
        ConfigError: bad options (see :class:`PruningConfig`).
    """
    config = PruningConfig(amount=amount, schedule="constant", saliency=saliency, granularity=granularity,
                           distribution=distribution, include=include, exclude=exclude, **options)
    if config.saliency not in ("l1", "l2"):
        from lightning_eff.errors import ConfigError

        raise ConfigError(f"prune(saliency={saliency!r}) needs gradients; use Pruner with before_optimizer_step, or 'l1'/'l2'.")
    pruner = Pruner(config)
    pruner.attach(model, total_steps=1)
    pruner.update(amount)
    return dict(pruner.masks)
