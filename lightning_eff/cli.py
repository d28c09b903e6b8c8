"""Hydra-free core of ``train.py``: validate a composed config, build everything, fit, test, report.

``train.py`` is a thin ``@hydra.main`` shim around :func:`run`; tests and sweeps call :func:`run`
(or :func:`compose` + :func:`run`) directly and get the metrics back as a plain dict.

Config layout (see ``conf/train.yaml``): ``data`` / ``task`` / every ``callbacks.<name>`` are
``_target_`` nodes; ``model`` is a registry spec ``{name: ..., **kwargs}``; ``trainer`` holds
``lightning.Trainer`` arguments (``trainer.strategy`` and each of ``trainer.plugins`` may be
``_target_`` nodes); ``stages`` lists the stages of the run (teacher -> student, fit -> QAT
fine-tuning, ...; see :mod:`lightning_eff.stages`); ``optimized_metric`` names the logged metric a
sweep optimises (checked before training). ``run(cfg, extra_callbacks=[...])`` adds callbacks (a
sweep's pruner or early stopping) to the last stage, the one whose metrics are returned.

Example:
    >>> from lightning_eff.cli import compose, run
    >>> cfg = compose("mobilenet_baseline", ["++trainer.fast_dev_run=true"])
    >>> metrics = run(cfg)  # a whole recipe on the real data (tests/test_cli.py runs it)  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_eff.atomic import AtomicCheckpointIO, write_results
from lightning_eff.callbacks.progress import ProgressLog, format_seconds
from lightning_eff.errors import ConfigError, did_you_mean
from lightning_eff.measure import format_table
from lightning_eff.models import list_models, model_signature
from lightning_eff.recipes import (
    CONF_DIR,
    REPO_ROOT,
    check_recipe,
    list_recipes,
)
from lightning_eff.report import build_report, evaluate_accuracy
from lightning_eff.stages import Stage, copy_backbone, plan_stages
from lightning_eff.strategies import multirun_strategy, processes_created_externally
from lightning_eff.training.allocator import ALLOCATOR_MODES, resolve_cpu_allocator
from lightning_eff.training.precision import (
    check_precision,
    choose_precision,
    measure_bf16,
)
from lightning_eff.validation import check_bool, check_choice, check_number

__all__ = ["compose", "run", "validate_config", "build", "list_recipes", "check_recipe", "data_shaped", "REPO_ROOT"]

log = logging.getLogger(__name__)


TOP_LEVEL_KEYS = {
    "name", "seed", "data", "model", "task", "trainer", "callbacks", "finetune", "run_dir",
    "test_after_fit", "print_report", "ckpt_path", "report", "teacher", "stages", "optimized_metric", "progress",
    "cpu_allocator",
}
DEFAULT_OPTIMIZED_METRIC = "test/acc"
# A teacher stage (distillation recipes): train or load the teacher, then hand it to Distillation.
TEACHER_KEYS = {"model", "checkpoint", "max_epochs", "lr", "optimizer", "scheduler", "warmup_fraction",
                "weight_decay", "limit_train_batches"}
FINETUNE_KEYS = {"max_epochs", "lr", "limit_train_batches", "callbacks", "scheduler", "warmup_fraction"}
REPORT_KEYS = {"batch_sizes", "latency", "memory", "repeats", "eval_batches", "sparsity_probe", "sparsity_probe_min",
               "compile", "channels_last"}
ARTIFACT_COLUMNS = ["engine", "bytes", "gzip_bytes", "latency_ms_b1", "top1_agreement", "max_abs_err", "sqnr_db", "verified", "error"]
# Trainer arguments the CLI owns (it builds them from other config groups).
_TRAINER_RESERVED = {"self", "callbacks", "logger"}


# --------------------------------------------------------------------------------------------
# composition
# --------------------------------------------------------------------------------------------
def compose(recipe: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/train.yaml`` (+ ``recipes/<recipe>.yaml``) with Hydra's compose API.

    Args:
        recipe: recipe name (as in ``+recipe=NAME``) or ``None`` for the plain defaults.
        overrides: Hydra override strings, e.g. ``["++trainer.fast_dev_run=true"]``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    if recipe is not None:
        check_recipe(recipe)
        overrides = [f"+recipe={recipe}", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


# --------------------------------------------------------------------------------------------
# validation and building
# --------------------------------------------------------------------------------------------
def _import_target(path: str, key: str) -> Any:
    module_name, _, attr = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}._target_={path!r} cannot be imported: {err}") from err


def _check_kwargs(key: str, fn: Any, given: Iterable[str]) -> None:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n in params if n != "self"]
    for name in given:
        if name not in params:
            raise ConfigError(f"unknown key {key}.{name}; valid keys: {sorted(valid)}.{did_you_mean(name, valid)}")


def _check_node_keys(key: str, node: Mapping, valid: set[str]) -> None:
    for name in node:
        if name not in valid:
            raise ConfigError(f"unknown key {key}.{name}; valid keys: {sorted(valid)}.{did_you_mean(name, valid)}")


def _check_target_node(key: str, node: Any, extra: Iterable[str] = ()) -> None:
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ConfigError(f"{key} must be a mapping with a _target_ (got {node!r})")
    target = _import_target(node["_target_"], key)
    _check_kwargs(key, target, [k for k in node if k != "_target_"] + list(extra))


def validate_config(cfg: DictConfig | Mapping) -> None:
    """Reject unknown keys and malformed nodes, naming the key (values are checked when built).

    Raises:
        ConfigError: the first problem found, e.g. ``unknown key trainer.max_epoch; ... Did you mean 'max_epochs'?``
    """
    if isinstance(cfg, DictConfig):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"required value(s) not set: {missing} (marked ??? by the recipe); give them on the "
                              f"command line, e.g. {missing[0]}=...")
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    _check_node_keys("<root>", c, TOP_LEVEL_KEYS)
    _check_target_node("data", c.get("data"))
    _check_model("model", c.get("model"))
    teacher = c.get("teacher")
    if teacher is not None:
        _check_node_keys("teacher", teacher, TEACHER_KEYS)
        if teacher.get("model") is None and teacher.get("checkpoint") is None:
            raise ConfigError("teacher needs a model spec (to train it here) or a checkpoint (.ckpt or Hugging Face folder).")
    finetune = c.get("finetune")
    if finetune is not None:
        _check_node_keys("finetune", finetune, FINETUNE_KEYS)
    _check_target_node("task", c.get("task"), extra=["model"])
    trainer = c.get("trainer") or {}
    valid_trainer = set(inspect.signature(L.Trainer.__init__).parameters) - _TRAINER_RESERVED
    _check_node_keys("trainer", trainer, valid_trainer)
    if isinstance(trainer.get("strategy"), Mapping):
        _check_target_node("trainer.strategy", trainer["strategy"])
    if trainer.get("precision") is not None:
        check_precision(trainer["precision"])  # a ConfigError naming the choices; resolved per stage in run()
    for name, stage in (c.get("stages") or {}).items():
        value = ((stage or {}).get("trainer") or {}).get("precision") if isinstance(stage, Mapping) else None
        if value is not None:
            check_precision(value, f"stages.{name}.trainer.precision")
    check_choice("cpu_allocator", c.get("cpu_allocator", "auto"), ALLOCATOR_MODES)
    plugins = trainer.get("plugins")
    for i, node in enumerate([] if plugins is None else plugins if isinstance(plugins, list) else [plugins]):
        if isinstance(node, Mapping):
            _check_target_node(f"trainer.plugins[{i}]", node)
    for name, node in (c.get("callbacks") or {}).items():
        if node is not None:
            _check_target_node(f"callbacks.{name}", node)
    for stage in plan_stages(c):
        key = f"stages.{stage.name}" if c.get("stages") is not None else ("finetune" if stage.continues else stage.name)
        if isinstance(stage.model, Mapping):
            _check_model(f"{key}.model", stage.model)
        if "_target_" in stage.task:
            _check_target_node(f"{key}.task", stage.task, extra=["model"])
        if stage.data:
            _check_target_node(f"{key}.data", {**dict(c["data"]), **stage.data})
        _check_node_keys(f"{key}.trainer", stage.trainer, valid_trainer)
        for name, node in stage.callbacks.items():
            if node is not None:
                _check_target_node(f"{key}.callbacks.{name}", node)
    check_optimized_metric(c)
    _check_node_keys("report", c.get("report") or {}, REPORT_KEYS)
    report = c.get("report") or {}
    if "sparsity_probe" in report:  # checked before training, not in the report after it
        check_bool("report.sparsity_probe", report["sparsity_probe"])
    if "sparsity_probe_min" in report:
        check_number("report.sparsity_probe_min", report["sparsity_probe_min"], low=0.0, high=1.0)


def known_metrics(c: Mapping[str, Any]) -> list[str] | None:
    """The metric names a run of ``c`` will log, as far as known before training (``None``: the task does not say).

    The task class's ``LOGGED_METRICS``, plus ``<stage>/test_acc`` of every stage with ``test: true``
    (a teacher stage) and the ``LOGGED_METRICS`` of the last stage's callbacks (``KNNMonitor``). A task class without ``LOGGED_METRICS`` is checked after the run instead.
    """
    task_cls = _import_target(c["task"]["_target_"], "task") if isinstance(c.get("task"), Mapping) else None
    logged = getattr(task_cls, "LOGGED_METRICS", None)
    if logged is None:
        return None
    plan = plan_stages(c)
    stage_metrics = [f"{s.name}/test_acc" for s in plan if s.test]
    # callbacks of the last stage (the one whose metrics a run returns) that declare what they log (KNNMonitor)
    last = plan[-1]
    nodes = [*((c.get("callbacks") or {}).values() if last.root_callbacks else []), *last.callbacks.values()]
    callback_metrics = [m for node in nodes if isinstance(node, Mapping) and "_target_" in node
                        for m in getattr(_import_target(node["_target_"], "callbacks"), "LOGGED_METRICS", ())]
    names = list(logged) + stage_metrics + callback_metrics
    if not c.get("test_after_fit", True):
        names = [n for n in names if not n.startswith("test/")]
    return names


def check_optimized_metric(c: Mapping[str, Any]) -> str:
    """``optimized_metric`` (default ``test/acc``), refused before training when the run will not log it.

    Raises:
        ConfigError: a name the run does not log, with the list of valid names.
    """
    metric = c.get("optimized_metric") or DEFAULT_OPTIMIZED_METRIC
    if not isinstance(metric, str):
        raise ConfigError(f"optimized_metric={metric!r} must be the name of a logged metric (e.g. 'test/acc').")
    names = known_metrics(c)
    if names is not None and metric not in names:
        hint = " (test metrics need test_after_fit=true)" if metric.startswith("test/") and not c.get("test_after_fit", True) else ""
        raise ConfigError(f"optimized_metric={metric!r} is not logged by this run{hint}; valid names: {names}.{did_you_mean(metric, names)}")
    return metric


def _check_model(key: str, model: Any) -> None:
    if not isinstance(model, Mapping) or "name" not in model:
        raise ConfigError(f"{key} must be a mapping with a 'name' (one of {list_models()}), got {model!r}")
    if model["name"] not in list_models():
        raise ConfigError(f"{key}.name={model['name']!r} is not registered; choose one of {list_models()}.{did_you_mean(model['name'], list_models())}")
    _check_kwargs(key, _model_factory(model["name"]), [k for k in model if k != "name"])


def _model_factory(name: str) -> Any:
    sig = model_signature(name)

    def factory(**kwargs: Any) -> None:  # carries the factory's signature for _check_kwargs
        return None

    factory.__signature__ = sig  # type: ignore[attr-defined]
    return factory


def build(node: Mapping, key: str, **extra: Any) -> Any:
    """Instantiate a ``_target_`` node with plain Python kwargs; a ``ConfigError`` is prefixed with ``key``."""
    node = dict(node)
    target = _import_target(node.pop("_target_"), key)
    try:
        return target(**node, **extra)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from err


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def _callbacks(nodes: Mapping | None, key: str, teacher: Any = None) -> list[L.Callback]:
    """Build callback nodes; a ``Distillation`` node without a teacher gets the run's teacher stage."""
    out = []
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        node = dict(node)
        if teacher is not None and str(node["_target_"]).endswith("Distillation") and node.get("teacher") is None:
            node["teacher"] = teacher
        out.append(build(node, f"{key}.{name}"))
    return out


def data_shaped(model_spec: dict, datamodule: Any) -> dict:
    """Fill in what the data decides: classes always, input channels for image models, the vocabulary size."""
    accepted = model_signature(model_spec["name"]).parameters
    if model_spec.get("num_classes") is None and "num_classes" in accepted:
        model_spec["num_classes"] = datamodule.num_classes
    if model_spec.get("in_chans") is None and "in_chans" in accepted and hasattr(datamodule, "input_shape"):
        model_spec["in_chans"] = datamodule.input_shape[0]
    if model_spec.get("vocab_size") is None and "vocab_size" in accepted and getattr(datamodule, "vocab_size", None):
        model_spec["vocab_size"] = datamodule.vocab_size
    return model_spec


def _load_stage_network(stage: Stage, datamodule: Any) -> tuple[Any, str]:
    """A stage with ``checkpoint``: its network loaded, not trained (``.ckpt``, HF folder, or a state dict + ``model``)."""
    from lightning_eff.models.loading import load_model

    path = str(stage.checkpoint)
    spec: Any = path
    if not (path.endswith(".ckpt") or Path(path).expanduser().is_dir()):  # a plain state-dict file
        if not isinstance(stage.model, Mapping):
            raise ConfigError(f"{stage.name}.checkpoint={path!r} is a state-dict file; give {stage.name}.model to build it.")
        spec = data_shaped(dict(stage.model, checkpoint=path), datamodule)
    return load_model(spec, option=f"{stage.name}"), path


def _tested_accuracy(task: Any, trainer: L.Trainer, staged: bool) -> dict[str, float] | None:
    """The report row ``trainer.test`` just measured: its top-1 ``test/acc`` over the whole test set, or None.

    Only where that figure is exactly the report's accuracy: a ClassificationTask (multiclass, top-1, micro), one
    process (no sampler padding), every test batch. The row is ``trained`` after a multi-stage run, else ``fp32``.
    """
    from torchmetrics.classification import MulticlassAccuracy

    from lightning_eff.tasks.classification import ClassificationTask

    metric = getattr(task, "test_acc", None)
    value = trainer.callback_metrics.get("test/acc")
    exact = (isinstance(task, ClassificationTask) and isinstance(metric, MulticlassAccuracy) and metric.top_k == 1
             and metric.average == "micro" and trainer.world_size == 1 and trainer.limit_test_batches in (1.0, None))
    if not exact or value is None:
        return None
    return {"trained" if staged else "fp32": round(float(value), 6)}  # a float32 metric: 0.9072 not 0.90719997


def _stage_eval(c: dict) -> int | None:
    return 2 if (c.get("trainer") or {}).get("fast_dev_run") else (c.get("report") or {}).get("eval_batches")


def _trainer(trainer_cfg: dict, callbacks: list, run_dir: Path, multirun: bool) -> L.Trainer:
    trainer_cfg = dict(trainer_cfg)
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, Mapping):  # a _target_ node: a configured Strategy object
        strategy = trainer_cfg["strategy"] = build(strategy, "trainer.strategy")
    if multirun:
        # A Hydra multirun child whose DDP ranks start by re-running the command line would re-run the whole
        # sweep from every rank (lightning-hydra-template #393): such a strategy starts its ranks in-process
        # instead (its comm hook, backend and DDP options kept); ranks started by torchrun/srun are left alone.
        trainer_cfg["strategy"], why = multirun_strategy(strategy)
        if why:
            warnings.warn(why, stacklevel=2)
    plugins = trainer_cfg.pop("plugins", None)
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    plugins = [build(p, f"trainer.plugins[{i}]") if isinstance(p, Mapping) else p for i, p in enumerate(plugins)]
    if not any(isinstance(p, L.pytorch.plugins.io.CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    logger = False
    if not trainer_cfg.get("fast_dev_run"):
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    trainer_cfg.setdefault("default_root_dir", str(run_dir))
    if trainer_cfg.get("enable_progress_bar", True) and not sys.stderr.isatty():
        # a redrawn bar in a file or CI log is thousands of fragments; ProgressLog writes the lines instead
        trainer_cfg["enable_progress_bar"] = False
    try:
        return L.Trainer(**trainer_cfg, callbacks=callbacks, logger=logger, plugins=plugins)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"trainer: {err}") from err


def run(cfg: DictConfig | Mapping, multirun: bool = False, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Validate ``cfg``, then run its stages (build data/task/callbacks/trainer, fit), test and write the report.

    Args:
        cfg: a composed config (``compose(...)`` or Hydra's ``cfg``).
        multirun: set by ``train.py`` inside a Hydra multirun (guards DDP re-launch).
        extra_callbacks: callbacks added to the last stage (a sweep's trial pruner, early stopping, ...).

    Returns:
        Plain dict: ``metrics`` (logged values), ``optimized_metric`` and its ``objective`` value,
        ``stages`` (the names run), ``report`` (one footprint row per model variant), ``run_dir``
        and ``artifacts``.
    """
    validate_config(cfg)
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg))
    run_started = time.perf_counter()
    progress = check_bool("progress", c.get("progress", True))
    if _handoff().get("pid") == os.getpid():  # this process's decisions of an earlier run: not this run's
        os.environ.pop(PRECISION_ENV, None)
    allocator = resolve_cpu_allocator(c.get("cpu_allocator", "auto"))  # before the data and model allocate anything
    plan = plan_stages(c)
    optimized = check_optimized_metric(c)
    run_dir = Path(c.get("run_dir") or Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(c.get("seed", 0)), workers=True, verbose=False)

    run_data = build(c["data"], "data")
    run_data.setup("fit")
    teacher, teacher_path, handed = None, None, None  # handed: (kind, network) for the next stage
    task, fp32_model, stage_metrics = None, None, {}
    executed: list[tuple[Stage, L.Trainer, list[L.Callback]]] = []
    precisions: dict[str, dict[str, Any]] = {}  # per trained stage: requested, resolved, facts (+ measured)
    for index, stage in enumerate(plan):
        last = index == len(plan) - 1
        stage_dir = run_dir if stage.main else run_dir / stage.name
        datamodule = run_data
        if stage.data:  # e.g. a pretraining stage on every training image, the labelled stages on a fraction
            datamodule = build({**dict(c["data"]), **stage.data}, f"stages.{stage.name}.data")
            datamodule.setup("fit")
        if stage.checkpoint is not None and not stage.continues:  # loaded, not trained
            if last:
                raise ConfigError(f"stages.{stage.name}: the last stage must train (it has a checkpoint and nothing to fit).")
            network, path = _load_stage_network(stage, datamodule)
        else:
            if stage.continues and task is None:
                raise ConfigError(f"stages.{stage.name}.model='previous': the stage before it trained nothing (it loaded a checkpoint).")
            if stage.continues:
                # e.g. QAT fine-tuning: a copy of the float model first, the report's fp32 baseline row
                fp32_model = copy.deepcopy(task.model).cpu().eval()
                task.hparams.lr = float(stage.task.get("lr", task.hparams.lr * 0.1))
                for hp, value in stage.task.items():
                    if hp != "lr":
                        task.hparams[hp] = value
            else:
                spec = data_shaped(dict(stage.model or c["model"]), datamodule)
                if spec.get("init_from") == "teacher":  # a student initialised from this run's teacher
                    if teacher_path is None:
                        raise ConfigError(f"stages.{stage.name}: model.init_from=teacher, but no earlier stage hands over a teacher.")
                    spec["init_from"] = teacher_path
                own = "_target_" in stage.task  # a stage's own task (self-supervised pretraining)
                task_node = dict(stage.task) if own else {**dict(c["task"]), **stage.task}
                task = build(task_node, f"stages.{stage.name}.task" if own else "task", model=spec)
                if handed is not None and handed[0] in ("init", "backbone"):
                    if handed[0] == "init":
                        src, dst = handed[1].state_dict(), task.model.state_dict()
                        shapes = [k for k in src if k in dst and src[k].shape != dst[k].shape]
                        missing, unexpected = [k for k in dst if k not in src], [k for k in src if k not in dst]
                        if shapes or missing or unexpected:
                            raise ConfigError(
                                f"stages.{stage.name}: the previous stage hands over 'init', but its weights do not fit this "
                                f"stage's model: {len(shapes)} of another shape (e.g. {shapes[:3]}), {len(missing)} missing, "
                                f"{len(unexpected)} unexpected; hand over 'backbone' to copy the matching part.")
                        task.model.load_state_dict(src)
                    else:
                        copied = copy_backbone(handed[1], task.model, f"stages.{stage.name}: hands_over backbone")
                        log.info("stage %s: %d tensors of the backbone handed over", stage.name, len(copied))
            callbacks = _callbacks(c.get("callbacks"), "callbacks", teacher=teacher) if stage.root_callbacks else []
            callbacks += _callbacks(stage.callbacks, f"stages.{stage.name}.callbacks", teacher=teacher)
            if last:
                callbacks += list(extra_callbacks)
            if progress:
                callbacks.insert(0, ProgressLog(stage=stage.name))
            trainer_cfg = {**dict(c.get("trainer") or {}), **stage.trainer}
            precisions[stage.name] = _stage_precision(trainer_cfg, task.model, datamodule, callbacks, stage.name)
            trainer_cfg["precision"] = precisions[stage.name]["resolved"]
            if "teacher" in stage.hands_over:
                trainer_cfg["enable_checkpointing"] = False  # its checkpoint is written below, atomically
            trainer = _trainer(trainer_cfg, callbacks, stage_dir, multirun)
            started = time.perf_counter()
            if progress and trainer.is_global_zero:
                log.info("stage %s (%d/%d) started: precision %s", stage.name, index + 1, len(plan), trainer.precision)
            trainer.fit(task, datamodule=datamodule, ckpt_path=c.get("ckpt_path") if stage.main else None)
            if progress and trainer.is_global_zero:
                log.info("stage %s done in %s (training and end-of-fit work; %s since the run started)", stage.name,
                         format_seconds(time.perf_counter() - started), format_seconds(time.perf_counter() - run_started))
            executed.append((stage, trainer, callbacks))
            network, path = task.model, None
            if stage.hands_over:
                path = str(stage_dir / f"{stage.name}.ckpt")  # a failed later stage never loses it
                trainer.save_checkpoint(path)
        if "teacher" in stage.hands_over:
            teacher, teacher_path = network, path
        handed = next(((h, network) for h in stage.hands_over if h in ("init", "backbone")), None)
        if stage.test and not last:
            acc = evaluate_accuracy(copy.deepcopy(network).cpu().eval(), datamodule.test_dataloader(), _stage_eval(c))
            log.info("stage %s: test accuracy %.4f (%s)", stage.name, acc, path)
            stage_metrics[f"{stage.name}/test_acc"] = acc

    final_trainer = executed[-1][1]
    main = next((s.name for s, _, _ in executed if s.main), executed[0][0].name)
    precision = {**precisions[main], "stages": precisions}
    root_requested = (c.get("trainer") or {}).get("precision")
    for stage, _, _ in executed:  # the saved config says what ran
        _record_precision(c, stage, precisions[stage.name]["resolved"], root_requested)
    fit_metrics = {k: _to_float(v) for k, v in final_trainer.callback_metrics.items()}  # trainer.test() replaces them
    tested = bool(c.get("test_after_fit", True))
    if tested:
        final_trainer.test(task, datamodule=datamodule, verbose=False)
    metrics = {**stage_metrics, **fit_metrics, **{k: _to_float(v) for k, v in final_trainer.callback_metrics.items()}}
    if optimized not in metrics:  # a task without LOGGED_METRICS: told now, and the trained model is still reported
        warnings.warn(f"optimized_metric={optimized!r} was not logged by this run (objective = None); logged: {sorted(metrics)}.",
                      stacklevel=2)
    report_started = time.perf_counter()
    if progress and final_trainer.is_global_zero:
        log.info("report: measuring every variant (accuracy, footprint, latency)")
    if final_trainer.is_global_zero:  # no collectives inside; other DDP ranks would only time against rank 0
        report = build_report(task, datamodule, [cb for _, _, cbs in executed for cb in cbs], c.get("report") or {},
                              fp32_model=fp32_model, fast=bool((c.get("trainer") or {}).get("fast_dev_run")),
                              measured_acc=_tested_accuracy(task, final_trainer, fp32_model is not None) if tested else None)
    else:
        report = {"rows": {}, "artifacts": [], "sparsity": [], "int8_speed": [], "cpu": {}}
    if progress and final_trainer.is_global_zero:
        log.info("report done in %s; run done in %s", format_seconds(time.perf_counter() - report_started),
                 format_seconds(time.perf_counter() - run_started))
    result = {"metrics": metrics, "optimized_metric": optimized, "objective": metrics.get(optimized),
              "stages": [s.name for s in plan], "report": report["rows"], "artifacts": report["artifacts"],
              "sparsity_latency": report["sparsity"], "int8_speed": report["int8_speed"], "cpu": report["cpu"],
              "precision": precision, "cpu_allocator": allocator, "run_dir": str(run_dir)}
    if final_trainer.is_global_zero:
        write_results(run_dir / "results.json", {"config": c, **result})
        if c.get("print_report", True):
            print(format_table(report["rows"]))
            if report["artifacts"]:
                print(format_table({f"{a['variant']}.{a['format']}": a for a in report["artifacts"]}, columns=ARTIFACT_COLUMNS))
            for sentence in report["sparsity"] + report["int8_speed"]:  # did the zeros / int8 buy latency on this CPU?
                print(sentence)
            print(f"results: {run_dir / 'results.json'}")
    return result


#: How Lightning's launcher hands ``auto``'s per-stage decisions to the ranks it starts by re-running the command line
#: (``trainer.strategy=ddp``): ``{"pid": <the launching process>, "stages": {name: value}}``; the launching process
#: measures, its ranks read the decision instead of measuring apart.
PRECISION_ENV = "LIGHTNING_EFF_AUTO_PRECISION"


def _handoff() -> dict[str, Any]:
    """The launching process's decisions (:data:`PRECISION_ENV`), ``{}`` when there are none or they do not parse."""
    try:
        value = json.loads(os.environ.get(PRECISION_ENV) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) and isinstance(value.get("stages"), dict) else {}


def _decides_for_all_ranks(trainer_cfg: Mapping) -> bool:
    """Whether this process's measurement decides for every rank of the stage: one machine, no ranks started yet.

    ``ddp_spawn`` ranks get the Trainer built here; ``ddp`` ranks read :data:`PRECISION_ENV`. Once Lightning has
    started ``ddp`` ranks (it then sets ``LOCAL_RANK`` here too) a later stage's decision can no longer reach them,
    so every process of such a stage, this one included, uses the hardware rule.
    """
    return str(trainer_cfg.get("num_nodes", 1)) == "1" and not processes_created_externally()


def _launcher_precision(stage: str) -> str | None:
    """The decision of the process that launched this rank (``None``: not such a rank, or nothing decided for it)."""
    handoff = _handoff()
    if not processes_created_externally() or handoff.get("pid") in (None, os.getpid()):
        return None  # a process never reads its own hand-off as a rank would
    value = handoff["stages"].get(stage)
    return value if isinstance(value, str) else None


def _train_inputs(datamodule: L.LightningDataModule) -> Any:
    """The inputs of the first training batch, drawn without moving the run's random stream (shuffling)."""
    from lightning_eff.batch import model_inputs, to_cpu

    with torch.random.fork_rng(devices=[]):
        return to_cpu(model_inputs(next(iter(datamodule.train_dataloader()))))


def _stage_precision(trainer_cfg: Mapping, network: nn.Module, datamodule: L.LightningDataModule,
                     callbacks: Sequence[L.Callback], stage: str = "fit") -> dict[str, Any]:
    """The stage's precision, resolved: ``auto`` on a CPU with bf16 hardware measures the stage's network on a real
    batch in the layout it will train in. DDP ranks must agree: the process that launches them measures and hands
    its decision down (:data:`PRECISION_ENV`); ranks started outside (torchrun, srun) or several nodes, where no
    process decides for all, use the hardware rule."""
    from lightning_eff.callbacks.layout import ChannelsLast

    requested = trainer_cfg.get("precision", "32-true")
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    auto = str(requested) == "auto"
    launched = _launcher_precision(stage) if auto else None
    if launched is not None:
        check_precision(launched, PRECISION_ENV)
        log.info("stage %s: precision=auto is %r, as the process that launched this rank decided", stage, launched)
        return {**choose_precision(launched, accelerator), "requested": "auto", "decided_by": "launching process"}
    measure = None
    if auto and _decides_for_all_ranks(trainer_cfg):
        channels_last = any(isinstance(cb, ChannelsLast) for cb in callbacks)

        def measure() -> dict[str, Any]:
            return measure_bf16(network, _train_inputs(datamodule), channels_last=channels_last)

    decision = choose_precision(requested, accelerator, measure=measure)
    if measure is not None:  # the ranks Lightning starts by re-running this command read it
        handoff = _handoff()
        stages = handoff["stages"] if handoff.get("pid") == os.getpid() else {}
        os.environ[PRECISION_ENV] = json.dumps({"pid": os.getpid(), "stages": {**stages, stage: decision["resolved"]}})
    return decision


def _record_precision(c: dict, stage: Stage, resolved: str, root_requested: Any) -> None:
    """Write the resolved value into the saved config, so that re-running it trains as this run did: where the stage
    gave its own ``precision``, there; else the main stage's at the root, and any other stage that inherited the
    root's ``auto`` gets a ``trainer.precision`` of its own (its network may have resolved otherwise)."""
    node = (c.get("stages") or {}).get(stage.name)
    own = (node or {}).get("trainer") or {}
    if own.get("precision") is not None:
        own["precision"] = resolved
    elif stage.main:
        c.setdefault("trainer", {})["precision"] = resolved
    elif str(root_requested) == "auto":
        stages = c.setdefault("stages", {})
        stages[stage.name] = dict(node or {})
        stages[stage.name]["trainer"] = {**(stages[stage.name].get("trainer") or {}), "precision": resolved}


def _to_float(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    return v
