"""``FootprintMonitor``: the survey's footprint metrics as first-class run outputs.

Quality numbers alone cannot tell whether pruning or quantization paid off; the survey
(Menghani 2021, §2) asks for model size, latency, compute and memory beside accuracy. This
callback logs the cheap figures at every validation (so ``ModelCheckpoint(monitor=
"footprint/nonzero_params")`` and sweeps can use them) and measures the full footprint at the end
of ``fit`` and ``test``, writing ``{"footprint": {...}, "metrics": {...}}`` to ``results.json``.

The measuring itself lives in :mod:`lightning_eff.measure`; this class only decides when
and on what (a CPU copy of ``pl_module.model``, or of the LightningModule when it has none).

Example:
    >>> from lightning import Trainer
    >>> monitor = FootprintMonitor(batch_sizes=[1], repeats=5, threads=1)
    >>> trainer = Trainer(callbacks=[monitor], max_epochs=1, logger=False)  # doctest: +SKIP
    >>> trainer.fit(task, datamodule=dm); monitor.report["footprint"]["params"]  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_eff.atomic import write_results
from lightning_eff.callbacks.base import EffCallback
from lightning_eff.callbacks.common import example_inputs
from lightning_eff.compression.quantization.engines import (
    model_engine,
    quantized_engine,
)
from lightning_eff.errors import ConfigError
from lightning_eff.measure import (
    SavedTensorCounter,
    count_nonzero_parameters,
    count_parameters,
    measure_footprint,
    process_peak_rss_mb,
    serialize_state_dict,
)
from lightning_eff.protocols import deployables
from lightning_eff.report import describe_model
from lightning_eff.validation import as_list, check_bool, check_int

__all__ = ["FootprintMonitor", "FootprintConfig"]

log = logging.getLogger(__name__)
_STATE_VERSION = 1


@dataclass(frozen=True)
class FootprintConfig:
    """Validated options of :class:`FootprintMonitor` (see there)."""

    batch_sizes: tuple[int, ...] = (1, 32)
    latency: bool = True
    memory: bool = True
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None
    output_dir: str | None = None
    filename: str = "results.json"
    log_every_validation: bool = True
    variants: bool = True
    activations: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.batch_sizes, (str, bytes)) or not isinstance(self.batch_sizes, Sequence):
            raise ConfigError(f"batch_sizes={self.batch_sizes!r} must be a list of positive integers, e.g. [1, 32].")
        for batch in self.batch_sizes:
            check_int("batch_sizes[]", batch, low=1)
        check_bool("latency", self.latency)
        check_bool("memory", self.memory)
        check_int("warmup", self.warmup, low=0)
        check_int("repeats", self.repeats, low=1)
        check_int("threads", self.threads, low=1, allow_none=True)
        if self.output_dir is not None and not isinstance(self.output_dir, (str, os.PathLike)):
            raise ConfigError(f"output_dir={self.output_dir!r} must be a path or None (None = the trainer's log_dir).")
        if not isinstance(self.filename, str) or not self.filename.endswith(".json") or os.sep in self.filename:
            raise ConfigError(f"filename={self.filename!r} must be a plain file name ending in '.json', e.g. 'results.json'.")
        check_bool("log_every_validation", self.log_every_validation)
        check_bool("variants", self.variants)
        check_bool("activations", self.activations)


class FootprintMonitor(EffCallback):
    """Log footprint metrics during training and write a footprint report at the end.

    * ``on_validation_epoch_end`` (not in the sanity check): logs ``footprint/params``,
      ``footprint/nonzero_params``, ``footprint/sparsity``, ``footprint/fp32_bytes``.
    * ``on_fit_end`` / ``on_test_end``: measures everything :func:`measure_footprint` reports on
      a CPU copy of the model in eval mode, merges float metrics from ``trainer.callback_metrics``
      and writes ``<output_dir>/<filename>`` atomically. Lightning forbids logging in
      ``on_fit_end``, so the final figures are logged in ``on_test_epoch_end`` when a test follows.

    Only global rank zero measures and writes. A failed measurement is reported as ``None``
    (or the whole report is skipped with a warning); it never stops training.

    Args:
        batch_sizes: batch sizes to time (``latency_ms_b<N>`` keys).
        latency: measure latency.
        memory: measure peak forward memory.
        warmup: untimed calls before timing.
        repeats: timed calls (median reported).
        threads: ``torch.set_num_threads`` during timing (None keeps the current).
        output_dir: where to write the report (None: ``trainer.log_dir``, else ``default_root_dir``).
        filename: report file name (``.json``).
        log_every_validation: log the cheap metrics at each validation epoch end.
        variants: also measure, at fit end, every deployable model other callbacks offer (the int8 models
            of QAT/PTQ, a compacted pruned model) as rows of ``report["variants"]``. Each row (and the main
            ``footprint``) says in ``"model"`` which model it measures: under QAT the trained network is a
            fake-quant training graph, not a deployable model.
        activations: count the bytes autograd saves for backward in the first training step (the real
            step: your ``training_step``, precision and activation checkpointing included; a
            :class:`~lightning_eff.measure.SavedTensorCounter` from batch start to ``on_before_backward``),
            logged as ``footprint/saved_activation_mib`` and reported under ``"activations"`` with the
            process's peak resident memory.
        module_attr: attribute of the LightningModule holding the network (``None``: the module itself).

    Raises:
        ConfigError: an option has an invalid type or value.
    """

    def __init__(
        self,
        batch_sizes: Sequence[int] = (1, 32),
        latency: bool = True,
        memory: bool = True,
        warmup: int = 3,
        repeats: int = 10,
        threads: int | None = None,
        output_dir: str | None = None,
        filename: str = "results.json",
        log_every_validation: bool = True,
        variants: bool = True,
        activations: bool = False,
        module_attr: str | None = "model",
    ) -> None:
        super().__init__(module_attr)
        batch_sizes = tuple(as_list("batch_sizes", batch_sizes))  # one int is one batch size; ListConfig too
        self.config = FootprintConfig(
            batch_sizes, latency, memory, warmup, repeats, threads,
            None if output_dir is None else str(output_dir), filename, log_every_validation, variants, activations,
        )
        self._counter: SavedTensorCounter | None = None
        self._activations: dict[str, float] | None = None
        self.report: dict[str, Any] = {}
        self.path: Path | None = None
        self._output_dir: str | None = None
        self._fingerprint: str | None = None
        self._pending_log: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.config.filename, output_dir=self.config.output_dir)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # trainer.log_dir broadcasts from rank 0, so every rank must ask for it: here, not in a
        # rank-zero-only hook where the other ranks would never join the collective.
        if self.config.output_dir is not None:
            self._output_dir = self.config.output_dir
        else:
            self._output_dir = trainer.log_dir or trainer.default_root_dir

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.config.log_every_validation:
            return
        try:
            figures = _cheap_figures(self.network(pl_module))
        except Exception as err:  # never stop training for a report
            rank_zero_warn(f"FootprintMonitor: could not count parameters ({type(err).__name__}: {err}).")
            return
        for key, value in figures.items():
            # Logged on all ranks because ModelCheckpoint reads callback_metrics on every rank. The value is
            # identical on every rank (DDP keeps the weights in step): reducing with max is exact and tells
            # Lightning the epoch value is meant to be synced, so it does not warn "use sync_dist=True" per key.
            pl_module.log(f"footprint/{key}", value, on_step=False, on_epoch=True, prog_bar=False, logger=bool(trainer.loggers),
                          sync_dist=True, reduce_fx="max")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.config.activations and self._activations is None and self._counter is None:
            self._counter = SavedTensorCounter(exclude=pl_module).__enter__()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self._counter is None:
            return
        self._counter.__exit__(None, None, None)
        saved, self._counter = self._counter, None
        self._activations = {"saved_bytes": float(saved.saved_bytes), "saved_mib": saved.saved_bytes / 2**20,
                             "peak_rss_mb": process_peak_rss_mb(), "step": int(trainer.global_step)}
        pl_module.log("footprint/saved_activation_mib", self._activations["saved_mib"], on_step=True, on_epoch=False,
                      logger=bool(trainer.loggers))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._counter is not None:  # the step skipped backward (training_step returned None)
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:  # never leave the saved-tensor hooks installed after a failed step
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._measure(trainer, pl_module, "fit"):
            self._pending_log = {k: float(v) for k, v in self.report["footprint"].items() if isinstance(v, (int, float))}
            self._write()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self._measure(trainer, pl_module, "test"):  # reuses the fit-end figures if the model is unchanged
            self._pending_log = {k: float(v) for k, v in self.report["footprint"].items() if isinstance(v, (int, float))}
        for key, value in self._pending_log.items():
            # Only rank zero measured: rank_zero_only=True makes Lightning skip the reduction (the other ranks never
            # log these keys); sync_dist=True says that is intended, so it does not warn "use sync_dist=True" per key.
            pl_module.log(f"footprint/{key}", value, rank_zero_only=True, sync_dist=True, logger=bool(trainer.loggers))
        self._pending_log = {}

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._measure(trainer, pl_module, "test"):
            self._write()

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "report": copy.deepcopy(self.report)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.report = copy.deepcopy(dict(state_dict.get("report", {})))

    # ------------------------------------------------------------------ internals

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> bool:
        """Measure the footprint (if the model changed since last time) and merge metrics; False on failure."""
        try:
            model = _cpu_copy(self.network(pl_module))
            inputs = None
            fingerprint = hashlib.sha1(serialize_state_dict(model)).hexdigest() + type(model).__qualname__
            if fingerprint != self._fingerprint or "footprint" not in self.report:
                inputs = example_inputs(trainer, 1)
                if inputs is None:
                    rank_zero_warn(
                        "FootprintMonitor: no example inputs (no datamodule.sample_inputs and no dataloader batch);"
                        " reporting size only, without MACs, latency and memory."
                    )
                    figures = _cheap_figures(model)
                    figures.update(dict.fromkeys(["gzip_bytes", "macs", "peak_mem_mb"]))
                else:
                    cfg = self.config
                    figures = measure_footprint(
                        model, inputs, batch_sizes=cfg.batch_sizes, latency=cfg.latency, memory=cfg.memory,
                        warmup=cfg.warmup, repeats=cfg.repeats, threads=cfg.threads,
                    )
                figures["model"] = describe_model(model)
                self.report = {"footprint": figures, "metrics": dict(self.report.get("metrics", {}))}
                if stage == "fit" and self.config.variants and inputs is not None:
                    self.report["variants"] = self._measure_variants(trainer, inputs)
                self._fingerprint = fingerprint
            self.report["metrics"].update(_float_metrics(trainer.callback_metrics))
            if self._activations is not None:
                self.report["activations"] = dict(self._activations)
            self.report["stage"] = stage
            return True
        except Exception as err:  # a report must never cost the trained model
            rank_zero_warn(f"FootprintMonitor: footprint measurement failed at {stage} end ({type(err).__name__}: {err}).")
            return False

    def _measure_variants(self, trainer: pl.Trainer, inputs: Any) -> dict[str, dict[str, Any]]:
        """One row per deployable model of the other callbacks (int8 under its own engine)."""
        rows: dict[str, dict[str, Any]] = {}
        cfg = self.config
        for cb in deployables(trainer.callbacks, skip=self, exportable_only=True):
            for name, variant in cb.deployable_models().items():
                try:
                    with quantized_engine(model_engine(variant)):
                        row = measure_footprint(variant, inputs, batch_sizes=cfg.batch_sizes, latency=cfg.latency,
                                                memory=cfg.memory, warmup=cfg.warmup, repeats=cfg.repeats, threads=cfg.threads)
                    rows[name] = {"model": describe_model(variant), **row}
                except Exception as err:  # one variant must not cost the others their row
                    rows[name] = {"model": describe_model(variant), "error": f"{type(err).__name__}: {err}"}
        return rows

    def _write(self) -> None:
        directory = self._output_dir or "."
        try:
            self.path = write_results(Path(directory) / self.config.filename, self.report)
            rank_zero_info(f"FootprintMonitor: wrote {self.path}")
        except OSError as err:
            rank_zero_warn(f"FootprintMonitor: could not write {self.config.filename} in {directory} ({err}).")


def _cpu_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode, so measuring never moves or switches the model being trained.

    Some modules cannot be deep-copied (e.g. with non-copyable hooks); a model already on CPU
    is then measured in place, which is safe because the measurements run in eval mode under
    ``no_grad`` and restore every submodule's training flag afterwards.
    """
    try:
        return copy.deepcopy(model).cpu().eval()
    except Exception as err:
        if all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()]):
            log.warning("FootprintMonitor: deepcopy failed (%s); measuring the CPU model in place", err)
            return model
        raise


def _cheap_figures(model: nn.Module) -> dict[str, float]:
    params = count_parameters(model)
    nonzero = count_nonzero_parameters(model)
    return {
        "params": float(params),
        "nonzero_params": float(nonzero),
        "sparsity": 1.0 - nonzero / params if params else 0.0,
        "fp32_bytes": float(len(serialize_state_dict(model))),
    }


def _float_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if key.startswith("footprint/"):
            continue  # they live in the "footprint" section
        if isinstance(value, Tensor) and value.numel() == 1:
            out[key] = float(value.detach().cpu())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


