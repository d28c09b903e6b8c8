"""``Pruning``: gradual, structured, N:M or dynamic sparsity for any LightningModule (survey §3.1.1).

The callback only decides *when*; the engine is :class:`~lightning_eff.compression.pruning.Pruner`.

* Masks are recomputed on the schedule (a pure function of ``global_step``) at the start of a
  training batch, applied after every optimizer step (a ``register_step_post_hook`` on each
  optimizer) and the gradients of pruned weights are zeroed in ``on_before_optimizer_step``
  (after backward and DDP's all-reduce), so pruned weights stay exactly zero with momentum,
  weight decay and Adam alike; their optimizer state is zeroed when the mask changes.
* Parameters stay plain ``nn.Parameter`` s and the masks live here, saved in the callback's
  ``state_dict`` as plain tensors keyed by parameter name: checkpoints load with
  ``torch.load(weights_only=True)``, ``load_from_checkpoint`` gives the sparse model, and
  ``fit(ckpt_path=...)`` continues the schedule exactly (Lightning's ``ModelPruning`` resumes at
  the wrong sparsity, RELIABILITY.md item 1).
* Identical masks on every DDP rank: computed from identical weights and broadcast from rank 0.
* With :class:`~lightning_eff.callbacks.QuantizationAwareTraining` in the same trainer, in either
  order, the masks are re-bound by name to the prepared (fake-quant) model in ``on_fit_start``; the
  converted int8 model keeps the zeros (upstream ``prune -> prepare_qat`` crashes, Lightning #11047).
* ``compact_during_fit=True`` (channel granularity): once the schedule reaches its final
  sparsity, the pruned channels are removed from the *live* model and every optimizer is rebuilt
  on the smaller parameters (momentum / Adam state sliced with them), so the remaining fine-tuning
  runs on the smaller, faster network. Resuming from a checkpoint taken after that compacts the
  fresh model first, from the channel indices saved in this callback's state.
* At the end of fit: ``deployable_models()`` gives the physically compacted model for channel
  pruning; ``artifacts()`` writes the compressed bitmask artifact for unstructured sparsity and
  states plainly whether sparsity bought latency.

Example:
    >>> trainer = L.Trainer(max_epochs=4, callbacks=[Pruning(amount=0.75, schedule="polynomial", frequency=20)])
    >>> trainer.fit(task, datamodule=dm)  # doctest: +SKIP
"""
from __future__ import annotations

import io
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_eff.batch import cpu_copy
from lightning_eff.callbacks.base import EffCallback, output_dir_option
from lightning_eff.callbacks.common import example_inputs
from lightning_eff.compression.pruning.config import PruningConfig
from lightning_eff.compression.pruning.pruner import Pruner
from lightning_eff.compression.pruning.sparse_format import VALUE_DTYPES, save_sparse
from lightning_eff.compression.pruning.speed import sparsity_latency
from lightning_eff.compression.pruning.structured import (
    channel_keep,
    compact,
    compact_training,
    find_channel_groups,
    slice_like,
)
from lightning_eff.errors import ConfigError
from lightning_eff.measure import count_parameters, gzip_size, interleaved_min_ms
from lightning_eff.naming import float_state_dict
from lightning_eff.validation import as_list, check_bool, check_choice

__all__ = ["Pruning"]

_STATE_VERSION = 1


def _tuple(name: str, value: Any) -> Any:
    """A list option as a tuple (a single string or number is one item; ``None`` stays ``None``)."""
    return None if value is None else tuple(as_list(name, value))


class Pruning(EffCallback):
    """Prune a LightningModule's network during training (flat options, buildable from Hydra).

    Args:
        amount: final sparsity, the fraction of selected weights (or channels) removed, in [0, 1).
        schedule: ``"polynomial"`` (Zhu & Gupta 2017 / TF-MOT ``PolynomialDecay``), ``"constant"``
            (``amount`` from ``begin``), ``"rounds"`` (the survey's Algorithm 1: ``rounds`` rounds of
            prune-then-fine-tune) or ``"steps"`` (explicit ``schedule_steps`` / ``schedule_amounts``).
        initial_amount: polynomial start sparsity.
        begin_step / begin_fraction: when pruning starts (default 0).
        end_step / end_fraction: when the polynomial / rounds schedule reaches ``amount`` (default 75%
            of training; the rest fine-tunes at the final sparsity).
        frequency: steps between polynomial mask updates.
        power: polynomial exponent.
        rounds: number of rounds for ``"rounds"``.
        schedule_steps / schedule_amounts: the explicit schedule for ``"steps"`` (non-decreasing).
        saliency: ``"l1"``, ``"l2"``, ``"taylor"`` (|w·g|) or ``"obd"`` (½·F·w², Fisher ≈ Hessian diagonal).
        granularity: ``"unstructured"``, ``"nm"`` (``n``:``m``, e.g. 2:4), ``"block"`` (``block``) or
            ``"channel"`` (filters; MobileNetV2 expansion channels, the head, and — when their
            producers ``conv_stem`` / ``conv_pwl`` are selected — the residual streams are pruned as
            coupled groups and removed physically at export).
        distribution: ``"global"``, ``"uniform"`` or ``"erk"``.
        n / m: the N:M pattern.
        block: ``[rows, cols]`` of a block.
        include / exclude: regexes over module names (``None`` = all modules of ``module_types``).
        module_types: class names to prune (base classes count: QAT's ``ConvBnReLU2d`` is a ``Conv2d``).
        parameter_names: parameters of each module to prune.
        min_params: skip parameters with fewer elements (thin layers).
        skip_first: keep the first selected layer dense.
        regrowth: ``None``, ``"rigl"`` or ``"set"``: move weights at fixed sparsity (``schedule="constant"``).
        regrowth_fraction: RigL's initial drop fraction (cosine-annealed).
        regrowth_interval: steps between regrowth updates.
        regrowth_end_step / regrowth_end_fraction: when regrowth stops (default 75% of training).
        rewind_step: lottery-ticket rewinding: after each mask update, weights go back to their
            values at this step (Frankle et al. 2020).
        seed: seed for SET's random regrowth.
        allow_full: accept ``amount=1.0``.
        module_attr: attribute of the LightningModule holding the network.
        log_sparsity: log ``pruning/sparsity`` every step and per-layer values at each mask update.
        export_sparse: values dtype of the compressed artifact (``"fp32"``, ``"fp16"``, ``"int8"``) or
            ``None`` for no artifact.
        output_dir: where to write it (default ``<trainer.default_root_dir>/pruning``; ``artifact_dir`` is its old name).
        compact_during_fit: channel granularity only: physically remove the pruned channels from
            the live model (and its optimizers' state) as soon as the schedule reaches ``amount``,
            so fine-tuning after that runs on the smaller network. Single process only (DDP's
            gradient buckets are bound to the parameters it was built with).

    Raises:
        ConfigError: any bad option, naming it (at construction); a selector naming a module without
            the parameter (at ``setup``). Warns ``NoEffectWarning`` when a selector matches nothing.
    """

    def __init__(
        self,
        amount: float = 0.5,
        schedule: str = "polynomial",
        initial_amount: float = 0.0,
        begin_step: int | None = None,
        begin_fraction: float | None = None,
        end_step: int | None = None,
        end_fraction: float | None = None,
        frequency: int = 100,
        power: float = 3.0,
        rounds: int = 3,
        schedule_steps: list[int] | None = None,
        schedule_amounts: list[float] | None = None,
        saliency: str = "l1",
        granularity: str = "unstructured",
        distribution: str = "global",
        n: int = 2,
        m: int = 4,
        block: list[int] | None = None,
        include: list[str] | str | None = None,
        exclude: list[str] | str | None = None,
        module_types: list[str] | None = ("Conv1d", "Conv2d", "Conv3d", "Linear"),
        parameter_names: list[str] | str = ("weight",),
        min_params: int = 0,
        skip_first: bool = False,
        regrowth: str | None = None,
        regrowth_fraction: float = 0.3,
        regrowth_interval: int = 100,
        regrowth_end_step: int | None = None,
        regrowth_end_fraction: float | None = None,
        rewind_step: int | None = None,
        seed: int = 0,
        allow_full: bool = False,
        module_attr: str = "model",
        log_sparsity: bool = True,
        export_sparse: str | None = "fp32",
        output_dir: str | None = None,
        artifact_dir: str | None = None,
        compact_during_fit: bool = False,
    ) -> None:
        super().__init__(module_attr)
        self.config = PruningConfig(
            amount=amount, schedule=schedule, initial_amount=initial_amount, begin_step=begin_step, begin_fraction=begin_fraction,
            end_step=end_step, end_fraction=end_fraction, frequency=frequency, power=power, rounds=rounds,
            schedule_steps=_tuple("schedule_steps", schedule_steps), schedule_amounts=_tuple("schedule_amounts", schedule_amounts), saliency=saliency,
            granularity=granularity, distribution=distribution, n=n, m=m, block=_tuple("block", block) if block is not None else (1, 4),
            include=_tuple("include", include), exclude=_tuple("exclude", exclude), module_types=_tuple("module_types", module_types),
            parameter_names=_tuple("parameter_names", parameter_names), min_params=min_params, skip_first=skip_first, regrowth=regrowth,
            regrowth_fraction=regrowth_fraction, regrowth_interval=regrowth_interval, regrowth_end_step=regrowth_end_step,
            regrowth_end_fraction=regrowth_end_fraction, rewind_step=rewind_step, seed=seed, allow_full=allow_full,
        )
        self.log_sparsity = check_bool("log_sparsity", log_sparsity)
        if export_sparse is not None:
            check_choice("export_sparse", export_sparse, VALUE_DTYPES)
        self.export_sparse = export_sparse
        self.output_dir = output_dir_option(output_dir, "Pruning", artifact_dir=artifact_dir)
        self.compact_during_fit = check_bool("compact_during_fit", compact_during_fit)
        if compact_during_fit and granularity != "channel":
            raise ConfigError(f"compact_during_fit=True needs granularity='channel' (got {granularity!r}): only whole "
                              "channels can be removed from a training model; other granularities keep their shapes.")
        if compact_during_fit and regrowth is not None:
            raise ConfigError(f"compact_during_fit=True cannot be combined with regrowth={regrowth!r}: removed channels "
                              "cannot grow back. Use one or the other.")
        self.pruner = Pruner(self.config)
        self._compacted: dict[str, torch.Tensor] | None = None
        self._restore_hook: tuple[nn.Module, Any] | None = None
        self._hooks: list[Any] = []
        self._bound: nn.Module | None = None
        self._trainer: L.Trainer | None = None
        self._artifacts: list[dict[str, Any]] = []
        self._final: nn.Module | None = None
        self._total_sparsity = 0.0

    @property
    def state_key(self) -> str:  # noqa: D102
        c = self.config
        return self._generate_state_key(granularity=c.granularity, include=c.include, module_attr=self.module_attr)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Current masks ``{parameter name: bool tensor}`` (``True`` = kept)."""
        return self.pruner.masks

    # ---------------------------------------------------------------- binding
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer
        if stage == "fit":
            # Validate selectors now (before training); binding happens again in on_fit_start,
            # after every callback's surgery (QAT prepare) and the checkpoint restore.
            self.pruner.validate(self.network(pl_module))
            self._bound = None
            if self.compact_during_fit:
                self._compacted = None  # set again by a compacted checkpoint being restored
                if trainer.world_size > 1:
                    raise ConfigError(f"compact_during_fit=True is not supported with {trainer.world_size} processes: DDP's "
                                      "gradient buckets are bound to the parameters it was built with. Leave it False: the "
                                      "channels are then removed from the exported copy at the end of fit.")
                self._install_restore_hook(pl_module)

    def _install_restore_hook(self, pl_module: L.LightningModule) -> None:
        """Compact a fresh model before a compacted checkpoint's weights are loaded into it.

        Lightning calls the module's ``on_load_checkpoint`` just before ``load_state_dict`` (and
        before the optimizers exist); the callback's own state is restored only later.
        """
        if self._restore_hook is not None:
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            self.restore_compaction(pl_module, checkpoint)
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint
        self._restore_hook = (pl_module, original)

    def restore_compaction(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> bool:
        """Remove the channels a checkpoint's model had removed during fit, so its weights load.

        Use it before ``load_state_dict`` when loading such a checkpoint outside ``fit``
        (``load_from_checkpoint`` builds a full-size model). Returns True when it compacted.
        """
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        keep = state.get("compacted")
        if not keep or self._compacted is not None:
            return False
        model = self.network(pl_module)
        groups = [g for g in find_channel_groups(model) if g.name in keep]
        compact(model, groups, {g.name: keep[g.name] for g in groups}, inplace=True)
        self._compacted = {k: v.clone() for k, v in keep.items()}
        return True

    def _compact_now(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = self.network(pl_module)
        groups = find_channel_groups(model)
        if not groups:
            rank_zero_info(f"Pruning: compact_during_fit found no channel groups in {type(model).__name__} (e.g. a QAT-prepared "
                           "graph); channels will be removed from the exported copy at the end instead.")
            self._compacted = {}
            return
        before = count_parameters(model)
        keep = channel_keep(groups, model, self.pruner.masks)
        slices = compact_training(model, groups, keep, trainer.optimizers)
        masks = {k: slice_like(m, slices.get(k, [])) for k, m in self.pruner.masks.items()}
        self.pruner.masks = {k: m for k, m in masks.items() if not bool(m.all())}  # removed channels need no mask
        self.pruner.rewind_state = None
        self._compacted = {k: v.cpu().clone() for k, v in keep.items()}
        self._bound = None
        self._bind(trainer, pl_module)
        after = count_parameters(model)
        rank_zero_info(f"Pruning: step {trainer.global_step}: removed the pruned channels from the training model "
                       f"({before:,} -> {after:,} parameters); optimizers rebuilt, fine-tuning continues on the smaller network.")
        if self.log_sparsity:
            pl_module.log("pruning/params_removed", 1.0 - after / before, on_step=True, on_epoch=False)

    def _bind(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = self.network(pl_module)
        if model is self._bound:
            return
        total = trainer.estimated_stepping_batches
        self.pruner.attach(model, total)
        self._bound = model

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._bind(trainer, pl_module)
        self._remove_hooks()
        for opt in trainer.optimizers:
            self._hooks.append(opt.register_step_post_hook(lambda *_: self.pruner.after_optimizer_step()))
        self.pruner.after_optimizer_step()  # resumed masks: weights are zero already; make sure
        self._total_sparsity = self.pruner.layer_sparsity()[1]
        if self.pruner.masks:
            rank_zero_info(f"Pruning: resumed at sparsity {self.pruner.sparsity:.3f} with {len(self.pruner.masks)} masks")

    def _broadcast(self, trainer: L.Trainer):
        if trainer.world_size > 1:
            return lambda obj: trainer.strategy.broadcast(obj, src=0)
        return None

    # ---------------------------------------------------------------- training
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:  # noqa: D102
        self._bind(trainer, pl_module)
        if self.pruner.on_step_start(trainer.global_step, trainer.optimizers, self._broadcast(trainer)):
            self._log_layers(pl_module)
        if (self.compact_during_fit and self._compacted is None and self.pruner.masks
                and self.pruner.target(trainer.global_step) >= self.config.amount - 1e-12):
            self._compact_now(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:  # noqa: D102
        self.pruner.before_optimizer_step(trainer.global_step, trainer.optimizers, self._broadcast(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: D102
        if self.log_sparsity and self.pruner.masks:
            pl_module.log("pruning/sparsity", self._total_sparsity, on_step=True, on_epoch=False)

    def _log_layers(self, pl_module: L.LightningModule) -> None:
        per, total = self.pruner.layer_sparsity()
        self._total_sparsity = total
        rank_zero_info(f"Pruning: step {self._trainer.global_step if self._trainer else '?'} target {self.pruner.sparsity:.3f}, "
                       f"mask sparsity {total:.3f} over {len(per)} tensors")
        if not self.log_sparsity:
            return
        metrics = {f"pruning/sparsity/{k}": v for k, v in per.items()}
        metrics["pruning/target"] = self.pruner.sparsity
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._remove_hooks()
        self._final = None
        self._artifacts = []
        if trainer.is_global_zero:
            model = self.finalize(pl_module)
            if self.export_sparse is not None and self.pruner.masks:
                self._artifacts = self._write_artifact(trainer, pl_module, model)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        self._remove_hooks()
        if self._restore_hook is not None:
            module, original = self._restore_hook
            module.on_load_checkpoint = original
            self._restore_hook = None

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---------------------------------------------------------------- export
    def finalize(self, pl_module: nn.Module | None = None) -> nn.Module:
        """A CPU eval *copy* of the network with the masks made permanent (the live model is untouched).

        With ``granularity="channel"`` the copy is compacted: pruned channels are physically removed.
        """
        if pl_module is None:
            if self._bound is None:
                raise ConfigError("Pruning.finalize(): no model yet; pass the LightningModule or attach the callback to a fit.")
            model = self._bound
        else:
            model = self.network(pl_module)
        out = cpu_copy(model)
        params = dict(out.named_parameters())
        with torch.no_grad():
            for k, m in self.pruner.masks.items():
                if k in params:
                    params[k].mul_(m.cpu())
        if self.config.granularity == "channel" and find_channel_groups(out):
            groups = find_channel_groups(out)
            masks = {k: v.cpu() for k, v in self.pruner.masks.items()}
            out = compact(out, groups, channel_keep(groups, out, masks), inplace=True)
        self._final = out
        return out

    def deployable_models(self) -> dict[str, nn.Module]:
        """``{"pruned_compact": model}`` for channel pruning (physically smaller); empty otherwise,
        since the trained model itself is the sparse float row of the report (or, after
        ``compact_during_fit``, already the compact model)."""
        if self.config.granularity != "channel" or not self.pruner.masks or self._compacted:
            return {}
        if self._final is None and self._bound is not None:
            self.finalize()
        return {"pruned_compact": self._final} if self._final is not None else {}

    def artifacts(self) -> list[dict[str, Any]]:
        """Entries of the compressed artifacts written at the end of fit (see the report)."""
        return list(self._artifacts)

    def _write_artifact(self, trainer: L.Trainer, pl_module: L.LightningModule, final: nn.Module) -> list[dict[str, Any]]:
        model = cpu_copy(self.network(pl_module))
        folder = self.output_folder(trainer, self.output_dir, "pruning")
        # Weights only: a QAT-prepared model also carries observer / fake-quant state (scales, ranges),
        # which belongs to the int8 export, not to the weight artifact (it would dominate small models).
        # Under the float network's names (a QAT graph renames fused BN to conv.bn.*), so the file loads
        # into the user's own float network as well as into the model it was written from.
        state = float_state_dict(model)
        path = save_sparse(state, folder / f"sparse_{self.export_sparse}.pt", values=self.export_sparse)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        dense = buffer.getvalue()
        data = path.read_bytes()
        _, sparsity = self.pruner.layer_sparsity()
        entry: dict[str, Any] = {
            "variant": f"pruned_sparse_{self.export_sparse}", "format": "bitmask+values", "path": str(path),
            "bytes": len(data), "gzip_bytes": gzip_size(data), "dense_bytes": len(dense), "dense_gzip_bytes": gzip_size(dense),
            "bytes_ratio": len(data) / len(dense), "mask_sparsity": sparsity, "granularity": self.config.granularity,
        }
        inputs = example_inputs(trainer, 1)
        repeats = 2 if trainer.fast_dev_run else 15
        if inputs is not None:
            try:
                if self.config.granularity == "channel":
                    ms = interleaved_min_ms({"masked": model, "compact": final}, inputs, repeats)
                    entry["latency"] = {"fp32_eager_cpu": {"masked_ms": ms["masked"], "compact_ms": ms["compact"],
                                                           "ratio": ms["compact"] / ms["masked"], "gain": ms["compact"] < 0.9 * ms["masked"]}}
                else:  # the int8 variants get the same probe in the report, under their own engines
                    probe = sparsity_latency(model, inputs, repeats=repeats)
                    entry["latency"] = {"fp32_eager_cpu": {"sparse_ms": probe["sparse_ms"], "dense_ms": probe["dense_ms"],
                                                           "ratio": probe["sparse_ms"] / probe["dense_ms"], "gain": probe["bought_latency"]}}
            except Exception as err:  # a latency probe must not cost the trained run
                entry["latency"] = {"error": f"{type(err).__name__}: {err}"}
        if self.config.granularity == "channel":
            entry["note"] = ("channel pruning: the pruned_compact model has the channels physically removed; its latency "
                             "row in the report is the real speed-up. The bitmask artifact only shrinks storage.")
        else:
            entry["note"] = (f"{self.config.granularity} sparsity shrinks storage (bitmask artifact, gzip) but buys NO latency on "
                             "CPU: PyTorch eager fp32 and the x86/QNNPACK int8 kernels are dense and multiply the zeros. "
                             "Use granularity='channel' for CPU speed-ups (N:M needs sparse tensor cores).")
        return [entry]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        state = self.pruner.state_dict()
        state["callback_version"] = _STATE_VERSION
        state["compacted"] = None if self._compacted is None else {k: v.clone() for k, v in self._compacted.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        self.pruner.load_state_dict(state_dict)
        compacted = state_dict.get("compacted")
        if compacted is not None:
            self._compacted = {k: v.clone() for k, v in compacted.items()}
        self._bound = None
