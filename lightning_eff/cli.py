"""Hydra-free core of ``train.py``: validate a composed config, build everything, fit, test, report.

``train.py`` is a thin ``@hydra.main`` shim around :func:`run`; tests and sweeps call :func:`run`
(or :func:`compose` + :func:`run`) directly and get the metrics back as a plain dict.

Config layout (see ``conf/train.yaml``): ``data`` / ``task`` / every ``callbacks.<name>`` are
``_target_`` nodes; ``model`` is a registry spec ``{name: ..., **kwargs}``; ``trainer`` holds
``lightning.Trainer`` arguments; ``finetune`` optionally runs a second fit stage (e.g. QAT) on the
trained model with its own callbacks.

Example:
    >>> from lightning_eff.cli import compose, run
    >>> cfg = compose("mobilenet_baseline", ["++trainer.fast_dev_run=true"])
    >>> metrics = run(cfg)  # a whole recipe on the real data (tests/test_cli.py runs it)  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import importlib
import inspect
import logging
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_eff.errors import ConfigError, did_you_mean
from lightning_eff.infra.checkpoint_io import AtomicCheckpointIO
from lightning_eff.infra.footprint import format_table, write_results
from lightning_eff.infra.report import build_report, evaluate_accuracy
from lightning_eff.models import list_models, model_signature
from lightning_eff.validation import check_bool, check_number

__all__ = ["compose", "run", "validate_config", "build", "list_recipes", "data_shaped", "REPO_ROOT"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
RECIPE_DIR = REPO_ROOT / "recipes"

TOP_LEVEL_KEYS = {
    "name", "seed", "data", "model", "task", "trainer", "callbacks", "finetune", "run_dir",
    "test_after_fit", "print_report", "ckpt_path", "report", "teacher",
}
# A teacher stage (distillation recipes): train or load the teacher, then hand it to Distillation.
TEACHER_KEYS = {"model", "checkpoint", "max_epochs", "lr", "optimizer", "scheduler", "warmup_fraction",
                "weight_decay", "limit_train_batches"}
FINETUNE_KEYS = {"max_epochs", "lr", "limit_train_batches", "callbacks", "scheduler", "warmup_fraction"}
REPORT_KEYS = {"batch_sizes", "latency", "memory", "repeats", "eval_batches", "sparsity_probe", "sparsity_probe_min"}
ARTIFACT_COLUMNS = ["engine", "bytes", "gzip_bytes", "latency_ms_b1", "top1_agreement", "max_abs_err", "sqnr_db", "verified", "error"]
# Trainer arguments the CLI owns (it builds them from other config groups).
_TRAINER_RESERVED = {"self", "callbacks", "logger", "plugins"}


# --------------------------------------------------------------------------------------------
# composition
# --------------------------------------------------------------------------------------------
def list_recipes() -> list[str]:
    """Names of the recipes in ``recipes/`` (the ``+recipe=NAME`` choices)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def check_recipe(name: str) -> None:
    """Raise ``ConfigError`` with a did-you-mean when ``name`` is not a recipe."""
    recipes = list_recipes()
    if name not in recipes:
        raise ConfigError(f"recipe={name!r} does not exist; available recipes: {recipes}.{did_you_mean(name, recipes)}")


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
        if teacher.get("model") is not None:
            _check_model("teacher.model", teacher["model"])
    _check_target_node("task", c.get("task"), extra=["model"])
    trainer = c.get("trainer") or {}
    valid_trainer = set(inspect.signature(L.Trainer.__init__).parameters) - _TRAINER_RESERVED
    _check_node_keys("trainer", trainer, valid_trainer)
    for name, node in (c.get("callbacks") or {}).items():
        if node is not None:
            _check_target_node(f"callbacks.{name}", node)
    finetune = c.get("finetune")
    if finetune is not None:
        _check_node_keys("finetune", finetune, FINETUNE_KEYS)
        for name, node in (finetune.get("callbacks") or {}).items():
            if node is not None:
                _check_target_node(f"finetune.callbacks.{name}", node)
    _check_node_keys("report", c.get("report") or {}, REPORT_KEYS)
    report = c.get("report") or {}
    if "sparsity_probe" in report:  # checked before training, not in the report after it
        check_bool("report.sparsity_probe", report["sparsity_probe"])
    if "sparsity_probe_min" in report:
        check_number("report.sparsity_probe_min", report["sparsity_probe_min"], low=0.0, high=1.0)


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


def _teacher_stage(c: dict, datamodule: Any, run_dir: Path, multirun: bool) -> tuple[Any, str, dict]:
    """Load the configured teacher checkpoint, or train the teacher on the same data and save it.

    Returns ``(teacher module, checkpoint path, {"teacher/test_acc": ...})``; the teacher checkpoint is
    written atomically to ``<run_dir>/teacher/teacher.ckpt`` so a failed student run never loses it.
    """
    from lightning_eff.learning.distillation.teacher import load_teacher

    t = c["teacher"]
    if t.get("checkpoint") is not None:
        path = str(t["checkpoint"])
        spec: Any = path
        if not (path.endswith(".ckpt") or Path(path).expanduser().is_dir()):  # a plain state-dict file
            if t.get("model") is None:
                raise ConfigError(f"teacher.checkpoint={path!r} is a state-dict file; give teacher.model to build it.")
            spec = data_shaped(dict(t["model"], checkpoint=path), datamodule)
        teacher = load_teacher(spec)
    else:
        task_node = dict(c["task"])
        for key in ("lr", "optimizer", "scheduler", "warmup_fraction", "weight_decay"):
            if t.get(key) is not None:
                task_node[key] = t[key]
        teacher_task = build(task_node, "task", model=data_shaped(dict(t["model"]), datamodule))
        trainer_cfg = dict(c.get("trainer") or {})
        trainer_cfg.update({k: t[k] for k in ("max_epochs", "limit_train_batches") if t.get(k) is not None})
        trainer_cfg["enable_checkpointing"] = False
        t_trainer = _trainer(trainer_cfg, [], run_dir / "teacher", multirun)
        t_trainer.fit(teacher_task, datamodule=datamodule)
        path = str(run_dir / "teacher" / "teacher.ckpt")
        t_trainer.save_checkpoint(path)
        teacher = teacher_task.model
    acc = evaluate_accuracy(copy.deepcopy(teacher).cpu().eval(), datamodule.test_dataloader(),
                            2 if (c.get("trainer") or {}).get("fast_dev_run") else (c.get("report") or {}).get("eval_batches"))
    log.info("teacher test accuracy %.4f (%s)", acc, path)
    return teacher, path, {"teacher/test_acc": acc}


def _trainer(trainer_cfg: dict, callbacks: list, run_dir: Path, multirun: bool) -> L.Trainer:
    trainer_cfg = dict(trainer_cfg)
    strategy = str(trainer_cfg.get("strategy", "auto"))
    if multirun and strategy.startswith("ddp") and "spawn" not in strategy:
        # A Hydra multirun child that launches DDP by re-executing the command line re-runs the
        # whole sweep from every rank (lightning-hydra-template #393): spawn keeps ranks in-process.
        warnings.warn(f"trainer.strategy={strategy!r} inside a Hydra multirun re-launches the sweep; using 'ddp_spawn'.", stacklevel=2)
        trainer_cfg["strategy"] = "ddp_spawn"
    logger = False
    if not trainer_cfg.get("fast_dev_run"):
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    trainer_cfg.setdefault("default_root_dir", str(run_dir))
    try:
        return L.Trainer(**trainer_cfg, callbacks=callbacks, logger=logger, plugins=[AtomicCheckpointIO()])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"trainer: {err}") from err


def run(cfg: DictConfig | Mapping, multirun: bool = False) -> dict[str, Any]:
    """Validate ``cfg``, build data/task/callbacks/trainer, fit, test and write the footprint report.

    Args:
        cfg: a composed config (``compose(...)`` or Hydra's ``cfg``).
        multirun: set by ``train.py`` inside a Hydra multirun (guards DDP re-launch).

    Returns:
        Plain dict: ``metrics`` (logged values), ``report`` (one footprint row per model variant),
        ``run_dir`` and ``artifacts``.
    """
    validate_config(cfg)
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg))
    run_dir = Path(c.get("run_dir") or Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(c.get("seed", 0)), workers=True, verbose=False)

    datamodule = build(c["data"], "data")
    datamodule.setup("fit")
    teacher, teacher_path, teacher_metrics = None, None, {}
    if c.get("teacher"):
        teacher, teacher_path, teacher_metrics = _teacher_stage(c, datamodule, run_dir, multirun)
    model_spec = data_shaped(dict(c["model"]), datamodule)
    if model_spec.get("init_from") == "teacher":  # a student initialised from this run's teacher
        model_spec["init_from"] = teacher_path
    task = build(c["task"], "task", model=model_spec)

    callbacks = _callbacks(c.get("callbacks"), "callbacks", teacher=teacher)
    trainer = _trainer(c.get("trainer") or {}, callbacks, run_dir, multirun)
    trainer.fit(task, datamodule=datamodule, ckpt_path=c.get("ckpt_path"))
    stages = [("fit", trainer, callbacks)]

    fp32_model = None
    finetune = c.get("finetune")
    if finetune:
        # Second stage on the trained model (e.g. QAT fine-tuning). A copy of the float model is
        # kept first: it is the report's fp32 baseline row.
        fp32_model = copy.deepcopy(task.model).cpu().eval()
        ft_trainer_cfg = dict(c.get("trainer") or {})
        ft_trainer_cfg["max_epochs"] = int(finetune.get("max_epochs", 1))
        if finetune.get("limit_train_batches") is not None:
            ft_trainer_cfg["limit_train_batches"] = finetune["limit_train_batches"]
        task.hparams.lr = float(finetune.get("lr", task.hparams.lr * 0.1))
        for hp in ("scheduler", "warmup_fraction"):
            if finetune.get(hp) is not None:
                task.hparams[hp] = finetune[hp]
        # Only the stage's own callbacks: a PTQ or pruning callback of the first stage must not run
        # again on the fine-tuned (e.g. fake-quantized) model.
        ft_callbacks = _callbacks(finetune.get("callbacks"), "finetune.callbacks")
        ft_trainer = _trainer(ft_trainer_cfg, ft_callbacks, run_dir / "finetune", multirun)
        ft_trainer.fit(task, datamodule=datamodule)
        stages.append(("finetune", ft_trainer, ft_callbacks))

    final_trainer = stages[-1][1]
    if c.get("test_after_fit", True):
        final_trainer.test(task, datamodule=datamodule, verbose=False)
    metrics = {**teacher_metrics, **{k: _to_float(v) for k, v in final_trainer.callback_metrics.items()}}
    report = build_report(task, datamodule, [cb for _, _, cbs in stages for cb in cbs], c.get("report") or {},
                          fp32_model=fp32_model, fast=bool((c.get("trainer") or {}).get("fast_dev_run")))
    result = {"metrics": metrics, "report": report["rows"], "artifacts": report["artifacts"],
              "sparsity_latency": report["sparsity"], "int8_speed": report["int8_speed"], "cpu": report["cpu"],
              "run_dir": str(run_dir)}
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


def _to_float(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    return v
