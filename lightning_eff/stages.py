"""Runs as stage pipelines: teacher -> student, fit -> fine-tune (QAT), pretrain -> fine-tune, search -> retrain.

Why a module of its own: ``cli.run`` used to hard-code teacher -> fit -> finetune. Every later
technique of the survey is another pipeline (self-supervised pretraining hands a backbone to
fine-tuning, architecture search hands an architecture to retraining, a teacher hands itself to
distillation), so a run is now a list of stages read from the config's ``stages:`` mapping.

A stage (``stages.<name>``, in mapping order; ``order: <int>`` moves a stage a recipe adds in front
of those of the recipe it extends):

``model``
    ``null`` — a new task on the run's ``model`` spec (the *main* stage is the first such stage);
    a registry spec ``{name: ..., **options}`` — a new task on that model; ``previous`` — continue
    training the previous stage's task (fine-tuning: the float model before it becomes the report's
    ``fp32`` row).
``checkpoint``
    load this stage's network from a ``.ckpt`` / state dict / Hugging Face folder instead of training it.
``trainer``
    ``lightning.Trainer`` arguments over the run's ``trainer`` (``max_epochs``, ``limit_train_batches``, ...).
``task``
    task options over the run's ``task`` (``lr``, ``optimizer``, ``scheduler``, ``warmup_fraction``,
    ``weight_decay``); with ``model: previous`` they change the running task (``lr`` defaults to a
    tenth of the previous one). A node with a ``_target_`` is the stage's own task instead (self-supervised
    pretraining: ``{_target_: lightning_eff.tasks.SimCLRTask, ...}``), built on the stage's model spec.
``data``
    datamodule options over the run's ``data`` for this stage only (a pretraining stage that reads every
    training image while the labelled stages use ``label_fraction: 0.01``); the stage gets its own datamodule.
``callbacks``
    the stage's own callback nodes; ``root_callbacks`` (default: true for the main stage only) also
    attaches the run's ``callbacks``.
``hands_over``
    what later stages receive: ``teacher`` (the network is the teacher of ``Distillation`` nodes without
    one, and ``model.init_from: teacher`` initialises from its checkpoint), ``init`` (its weights
    initialise the next stage's model, strictly) or ``backbone`` (the weights whose names and shapes
    match are copied into the next stage's model; a pretrained encoder).
``test``
    evaluate the stage's model on the test set at its end (``<name>/test_acc``); the last stage is
    always tested when ``test_after_fit`` is true.

``stages.<name>=null`` removes a stage (``fit: {}`` declares one with no options). Without ``stages:`` a run
is one stage, ``fit``. The older ``teacher:`` and ``finetune:`` keys still
work: they become the stages ``teacher`` (before ``fit``) and ``finetune`` (after it).

Example:
    >>> plan = plan_stages({"stages": {"teacher": {"model": {"name": "mobilenetv2"}, "hands_over": "teacher"},
    ...                                "fit": {}, "qat": {"model": "previous"}}})
    >>> [(s.name, s.main, s.root_callbacks) for s in plan]
    [('teacher', False, False), ('fit', True, True), ('qat', False, False)]
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_eff.errors import ConfigError, did_you_mean

__all__ = ["Stage", "STAGE_KEYS", "HANDS_OVER", "TASK_OVERRIDES", "plan_stages", "legacy_stages", "copy_backbone"]

STAGE_KEYS = {"model", "checkpoint", "trainer", "task", "data", "callbacks", "root_callbacks", "hands_over", "test", "order"}
HANDS_OVER = ("teacher", "init", "backbone")
TASK_OVERRIDES = ("lr", "optimizer", "scheduler", "warmup_fraction", "weight_decay", "label_smoothing", "momentum")


@dataclass
class Stage:
    """One stage of a run (see the module docstring for the keys)."""

    name: str
    model: Any = None
    checkpoint: str | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)
    root_callbacks: bool = False
    hands_over: list[str] = field(default_factory=list)
    test: bool = False
    main: bool = False

    @property
    def continues(self) -> bool:
        """Whether the stage keeps training the previous stage's task."""
        return self.model == "previous"


def _check_stage(name: str, node: Any) -> dict[str, Any]:
    key = f"stages.{name}"
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key} must be a mapping of stage options ({sorted(STAGE_KEYS)}), got {node!r}.")
    for option in node:
        if option not in STAGE_KEYS:
            raise ConfigError(f"unknown key {key}.{option}; valid keys: {sorted(STAGE_KEYS)}.{did_you_mean(option, sorted(STAGE_KEYS))}")
    model = node.get("model")
    if model is not None and model != "previous" and not (isinstance(model, Mapping) and "name" in model):
        raise ConfigError(f"{key}.model={model!r} must be null (the run's model), 'previous' or a spec {{name: ..., ...}}.")
    for option in ("trainer", "task", "data", "callbacks"):
        if node.get(option) is not None and not isinstance(node[option], Mapping):
            raise ConfigError(f"{key}.{option} must be a mapping, got {node[option]!r}.")
    own_task = "_target_" in (node.get("task") or {})
    if own_task and model == "previous":
        raise ConfigError(f"{key}.task has a _target_ (a new task) but {key}.model='previous' continues the previous one; "
                          "give one of them.")
    if (node.get("data") or {}).get("_target_") is not None:
        raise ConfigError(f"{key}.data overrides options of the run's data (e.g. label_fraction: 1.0); a _target_ is not allowed.")
    for option in [] if own_task else node.get("task") or {}:
        if option not in TASK_OVERRIDES:
            raise ConfigError(f"unknown key {key}.task.{option}; valid keys: {list(TASK_OVERRIDES)}.{did_you_mean(option, TASK_OVERRIDES)}")
    hands = node.get("hands_over") or []
    hands = [hands] if isinstance(hands, str) else list(hands)
    for h in hands:
        if h not in HANDS_OVER:
            raise ConfigError(f"{key}.hands_over={h!r} is not supported; choose from {list(HANDS_OVER)}.{did_you_mean(h, HANDS_OVER)}")
    for option in ("root_callbacks", "test"):
        if node.get(option) is not None and not isinstance(node[option], bool):
            raise ConfigError(f"{key}.{option}={node[option]!r} must be true or false.")
    if node.get("order") is not None and (isinstance(node["order"], bool) or not isinstance(node["order"], (int, float))):
        raise ConfigError(f"{key}.order={node['order']!r} must be a number.")
    return {**dict(node), "hands_over": hands}


def legacy_stages(c: Mapping[str, Any]) -> dict[str, Any]:
    """The ``stages`` mapping equivalent to the older ``teacher:`` / ``finetune:`` keys."""
    stages: dict[str, Any] = {}
    t = c.get("teacher")
    if t:
        stages["teacher"] = {
            "model": t.get("model"), "checkpoint": t.get("checkpoint"), "hands_over": ["teacher"], "test": True,
            "trainer": {k: t[k] for k in ("max_epochs", "limit_train_batches") if t.get(k) is not None},
            "task": {k: t[k] for k in ("lr", "optimizer", "scheduler", "warmup_fraction", "weight_decay") if t.get(k) is not None},
        }
        if stages["teacher"]["model"] is None:
            stages["teacher"].pop("model")
    stages["fit"] = {}
    f = c.get("finetune")
    if f:
        stages["finetune"] = {
            "model": "previous", "callbacks": f.get("callbacks") or {},
            "trainer": {"max_epochs": int(f.get("max_epochs", 1)),
                        **({"limit_train_batches": f["limit_train_batches"]} if f.get("limit_train_batches") is not None else {})},
            "task": {k: f[k] for k in ("lr", "scheduler", "warmup_fraction") if f.get(k) is not None},
        }
    return stages


def plan_stages(c: Mapping[str, Any]) -> list[Stage]:
    """Validate the ``stages`` of a config (or build them from ``teacher:`` / ``finetune:``) into an ordered plan.

    Raises:
        ConfigError: an unknown stage key, a bad value, ``stages`` together with ``teacher``/``finetune``,
            a first stage that continues a previous one, or a stage that hands over a teacher without
            a model or checkpoint.
    """
    nodes = c.get("stages")
    if nodes is not None and (c.get("teacher") or c.get("finetune")):
        raise ConfigError("give either stages: or the older teacher: / finetune: keys, not both (teacher/finetune are stages).")
    if nodes is None:
        nodes = legacy_stages(c)
    if not isinstance(nodes, Mapping) or not nodes:
        raise ConfigError(f"stages must be a non-empty mapping {{name: {{...}}}}, got {nodes!r}.")
    checked = [(name, _check_stage(name, node)) for name, node in nodes.items() if node is not None]  # null removes a stage
    checked = [item for _, item in sorted(enumerate(checked), key=lambda e: (e[1][1].get("order", e[0]), e[0]))]
    plan: list[Stage] = []
    main_seen = False
    for name, node in checked:
        model = node.get("model")
        stage = Stage(name=name, model=model, checkpoint=node.get("checkpoint"), trainer=dict(node.get("trainer") or {}),
                      task=dict(node.get("task") or {}), data=dict(node.get("data") or {}), callbacks=dict(node.get("callbacks") or {}),
                      hands_over=node["hands_over"], test=bool(node.get("test", False)))
        if stage.continues and not plan:
            raise ConfigError(f"stages.{name}.model='previous': the first stage has no previous stage to continue.")
        if "teacher" in stage.hands_over and model is None and stage.checkpoint is None:
            raise ConfigError(f"stages.{name} hands over a teacher: give it a model spec (to train it here) or a checkpoint.")
        # a stage with its own task (self-supervised pretraining) trains the run's model but is not the main stage
        stage.main = model is None and not main_seen and "teacher" not in stage.hands_over and "_target_" not in stage.task
        main_seen = main_seen or stage.main
        stage.root_callbacks = bool(node["root_callbacks"]) if node.get("root_callbacks") is not None else stage.main
        plan.append(stage)
    if not main_seen:  # no stage trains the run's own model: the last stage is the main one
        last = plan[-1]
        last.main = True
        if dict(checked)[last.name].get("root_callbacks") is None:
            last.root_callbacks = True
    return plan


def copy_backbone(source: Any, target: Any, option: str = "hands_over: backbone") -> list[str]:
    """Copy ``source``'s backbone into ``target`` (every tensor but the head's); return the names copied.

    How a pretrained encoder (self-supervised pretraining) reaches a model with a different head:
    :func:`lightning_eff.models.loading.load_backbone`, the same check as ``model.backbone_ckpt``.

    Raises:
        ConfigError: backbone tensors missing, unexpected or of another shape (named in the message).
    """
    from lightning_eff.models.backbone import load_backbone

    return load_backbone(target, source, option)
