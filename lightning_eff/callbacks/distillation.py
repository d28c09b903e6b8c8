"""``Distillation``: knowledge distillation into any LightningModule, without changing its code.

How it attaches (in ``setup()``; the student hooks are bound again at fit start and whenever the
network object is replaced, so it works before or after QAT in the callback list; undone in ``teardown()``):

- a forward hook on the student network (``pl_module.<module_attr>``, else the module itself)
  records the inputs and logits of its first call in each training step;
- ``pl_module.training_step`` is wrapped on the instance: the user's step runs unchanged and
  returns its task loss ``L_task``; the wrapper runs the frozen teacher on the *same inputs the
  student saw* (so augmentation or mixing done inside the step is respected) and returns
  ``λ1 · L_task + λ2 · T² · KL(p_T ‖ p_S) + Σ λ_f · L_feature`` (survey eq. 5 plus intermediate
  layers). With Lightning's DDP the wrapped step is still the one the strategy calls.

The teacher is kept on the callback, not on the LightningModule, so it is never in the optimizer,
the checkpoint (unless ``save_teacher=True``) or the DDP wrapper; it is frozen, kept in ``eval()``
and moved to the student's device. Learned projections for intermediate layers whose widths differ
*are* trained: they are attached as ``pl_module.distill_projections`` (saved in the checkpoint, so
resume is exact) and added to the optimizer when ``configure_optimizers`` did not include them.

Offline mode (``cache=PATH``): teacher logits are computed once over the training set (or read
from ``PATH``) keyed by example index, and training never runs the teacher. Our datamodules are
switched to index-carrying batches automatically; for other data wrap the dataset in
:class:`~lightning_eff.data.indexed.IndexedDataset`. Exact only without random augmentation.

Example:
    >>> from lightning_eff.models import create_model
    >>> teacher = create_model("mobilenetv2_tiny", num_classes=10, in_chans=1)  # your trained model, a .ckpt path, ...
    >>> cb = Distillation(teacher=teacher, temperature=4.0, kd_weight=0.7, task_weight=0.3)
    >>> trainer = L.Trainer(callbacks=[cb])
    >>> trainer.fit(task, datamodule=dm)
    >>> sorted(k for k in trainer.callback_metrics if k.startswith("distill/"))[:2]
    ['distill/agreement', 'distill/agreement_epoch']
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn

from lightning_eff.batch import IndexedBatch, call_with_inputs
from lightning_eff.callbacks.base import EffCallback
from lightning_eff.callbacks.common import module_attributes
from lightning_eff.data.indexed import IndexCollate
from lightning_eff.errors import ConfigError, did_you_mean
from lightning_eff.learning.distillation.losses import (
    FEATURE_LOSSES,
    check_logit_shapes,
    check_temperature,
    check_weight,
    kd_loss,
    make_projection,
)
from lightning_eff.learning.distillation.offline import (
    TeacherLogitCache,
    compute_teacher_logits,
    default_output_fn,
    model_fingerprint,
    pseudo_label,
)
from lightning_eff.learning.distillation.plumbing import (
    dataset_labels,
    ensure_in_optimizer,
    module_feature,
    sequential_indexed_loader,
)
from lightning_eff.learning.distillation.teacher import (
    check_not_student,
    freeze_teacher,
    load_teacher,
)
from lightning_eff.naming import canonical_name
from lightning_eff.schedules import ScheduledValue
from lightning_eff.surgery import canonical_modules
from lightning_eff.training.checkpointing import is_recomputing
from lightning_eff.validation import check_bool, check_choice, check_number

__all__ = ["Distillation"]

log = logging.getLogger(__name__)


class _Capture:
    """Forward hook state: the first call's inputs/outputs while armed."""

    def __init__(self) -> None:
        self.armed = False
        self.calls = 0
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.output: Any = None

    def arm(self) -> None:
        self.armed, self.calls, self.args, self.kwargs, self.output = True, 0, (), {}, None

    def release(self) -> None:
        """Drop the references (the step's graph, the batch) once used."""
        self.armed, self.args, self.kwargs, self.output = False, (), {}, None

    def __deepcopy__(self, memo: dict) -> _Capture:
        # a deep copy of the hooked student (report, export) gets an idle capture, not this step's tensors
        return _Capture()

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.armed:
            return
        self.calls += 1
        if self.calls == 1:
            self.args, self.kwargs, self.output = args, kwargs, output


class Distillation(EffCallback):
    """Distil a frozen teacher into the LightningModule being trained.

    Args:
        teacher: an ``nn.Module``, a Lightning ``.ckpt`` path, a Hugging Face model folder, a registered
            model name or spec ``{"name": ..., "checkpoint": ...}`` (see
            :func:`~lightning_eff.learning.distillation.load_teacher`). May be ``None`` only with an
            existing ``cache``.
        temperature: ``T > 0``; a number or a schedule ``{"start", "end", "begin_fraction"|"begin_step",
            "end_fraction"|"end_step", "power"}`` over global steps.
        kd_weight: ``λ2`` in ``[0, 1]`` (number or schedule) for ``T²·KL``.
        task_weight: ``λ1`` in ``[0, 1]`` (number or schedule) for the loss the user's step returns.
        layers: intermediate-layer pairs ``{student_module_name: teacher_module_name}`` (names relative
            to the student network and the teacher), or ``{student_name: {"teacher": name, "loss": kind,
            "weight": w}}``.
        feature_loss: default kind for ``layers``: ``"mse"`` (learned projection when widths differ),
            ``"cosine"`` (DistilBERT), ``"attention_transfer"`` (CNN maps) or ``"attention_kl"``
            (transformer attention matrices; needs eager attention).
        feature_weight: default weight ``λ_f >= 0`` of each layer loss.
        cache: path of a teacher-logit cache (offline distillation); built on first use, rebuilt when it was
            made for other data or another teacher. A relative path is under ``trainer.default_root_dir``.
        module_attr: attribute holding the student network (default ``"model"``; else the module itself).
        output_fn: extracts logits from the student's/teacher's output (default: ``.logits``/first/tensor).
        teacher_inputs: maps the student's ``(args, kwargs)`` to the teacher's; default the same inputs.
        teacher_class: LightningModule class to load a teacher ``.ckpt`` with.
        save_teacher: also store the teacher's weights in the checkpoint (off: a checkpoint stays the student's).
        log_agreement: log top-1 agreement with the teacher in training and validation.
        report_teacher: offer the teacher as a ``"teacher"`` row of the end-of-run footprint report.
        pseudo_labels: confidence threshold in ``[0, 1)``: before training, the teacher labels the datamodule's
            unlabeled pool (``datamodule.unlabeled_set()``; for ours, the training examples ``limit_train`` left
            out) and the examples it is at least this sure about join the training set with its labels.

    Raises:
        ConfigError: ``T <= 0``, a weight outside ``[0, 1]``, an unknown loss kind or layer name, a
            teacher that is the student, mismatched logits, manual optimisation.
    """

    def __init__(
        self,
        teacher: Any = None,
        temperature: float | Mapping = 4.0,
        kd_weight: float | Mapping = 0.5,
        task_weight: float | Mapping = 0.5,
        layers: Mapping[str, Any] | None = None,
        feature_loss: str = "mse",
        feature_weight: float = 1.0,
        cache: str | None = None,
        module_attr: str | None = "model",
        output_fn: Callable[[Any], Tensor] | None = None,
        teacher_inputs: Callable[[tuple, dict], tuple[tuple, dict]] | None = None,
        teacher_class: type | None = None,
        save_teacher: bool = False,
        log_agreement: bool = True,
        report_teacher: bool = True,
        pseudo_labels: float | None = None,
    ) -> None:
        super().__init__(module_attr)
        self.temperature = ScheduledValue("temperature", temperature, check_temperature)
        self.kd_weight = ScheduledValue("kd_weight", kd_weight, check_weight)
        self.task_weight = ScheduledValue("task_weight", task_weight, check_weight)
        check_choice("feature_loss", feature_loss, list(FEATURE_LOSSES))
        check_number("feature_weight", feature_weight, low=0.0)
        self.pairs = self._parse_layers(layers or {}, feature_loss, float(feature_weight))
        if teacher is None and cache is None:
            raise ConfigError("Distillation needs a teacher (module, .ckpt, HF folder or model name) or a logit cache.")
        if cache is not None and self.pairs:
            raise ConfigError("layers (intermediate distillation) need the teacher online; they cannot use cache=.")
        self.teacher_spec, self.cache_path = teacher, cache
        self.teacher_class = teacher_class
        self.output_fn = output_fn or default_output_fn
        self.teacher_inputs = teacher_inputs
        self.save_teacher = check_bool("save_teacher", save_teacher)
        self.log_agreement = check_bool("log_agreement", log_agreement)
        self.report_teacher = check_bool("report_teacher", report_teacher)
        self.pseudo_labels = check_number("pseudo_labels", pseudo_labels, low=0.0, high=1.0, high_inclusive=False,
                                          allow_none=True)
        if pseudo_labels is not None and teacher is None:
            raise ConfigError("pseudo_labels needs a teacher to label the pool (not just a logit cache).")
        self.pseudo_label_stats: dict[str, int] = {}
        self.teacher: nn.Module | None = None
        self.cache: TeacherLogitCache | None = None
        self._capture = _Capture()
        self._features: dict[str, dict[str, Any]] = {"student": {}, "teacher": {}}
        self._handles: list = []
        self._student_handles: list = []
        self._student: nn.Module | None = None
        self._patched: L.LightningModule | None = None
        self._total_steps: float | None = None
        self._warned_calls = False
        self._pending_teacher_state: dict[str, Any] | None = None  # load_state_dict before setup loaded the teacher
        self._state_key: str | None = None

    @property
    def state_key(self) -> str:  # noqa: D102
        # Two instances (e.g. two teachers) must not share a checkpoint slot. The teacher is named by its spec
        # (path, model name) or, for a module, by its weights' fingerprint: stable across runs, unlike id().
        if self._state_key is None:
            self._state_key = self.state_key_of(teacher=_spec_key(self.teacher_spec), cache=self.cache_path,
                                                layers=tuple((p["student"], p["teacher"]) for p in self.pairs) or None,
                                                module_attr=self.module_attr)
        return self._state_key

    # ------------------------------------------------------------------------------ options
    @staticmethod
    def _parse_layers(layers: Mapping[str, Any], kind: str, weight: float) -> list[dict[str, Any]]:
        pairs = []
        for s_name, spec in layers.items():
            spec = {"teacher": spec} if isinstance(spec, str) else dict(spec)
            unknown = set(spec) - {"teacher", "loss", "weight"}
            if unknown or "teacher" not in spec:
                raise ConfigError(f"layers[{s_name!r}]={spec!r}: give a teacher module name, optionally with 'loss' and 'weight'.")
            k = check_choice(f"layers[{s_name!r}].loss", spec.get("loss", kind), list(FEATURE_LOSSES))
            w = check_number(f"layers[{s_name!r}].weight", spec.get("weight", weight), low=0.0)
            pairs.append({"student": s_name, "teacher": spec["teacher"], "loss": k, "weight": float(w)})
        return pairs

    # ------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self._patched is not None:
            return
        if not pl_module.automatic_optimization:
            raise ConfigError("Distillation wraps the loss returned by training_step; manual optimisation is not supported.")
        student = self.network(pl_module)
        if self.teacher is None and self.teacher_spec is not None:
            self.teacher = load_teacher(self.teacher_spec, getattr(pl_module, "num_classes", None), self.teacher_class)
        if self.teacher is not None:
            check_not_student(self.teacher, pl_module)
            freeze_teacher(self.teacher)
            if self._pending_teacher_state is not None:
                self.teacher.load_state_dict(self._pending_teacher_state)
                self._pending_teacher_state = None
        self._bind_student(student)
        if self.pairs:
            self._hook_layers("teacher", self.teacher, self._handles)
            self._build_projections(trainer, pl_module, student)
        if self.pseudo_labels is not None and not self.pseudo_label_stats:
            self._add_pseudo_labels(trainer, pl_module)
        if self.cache_path is not None and trainer.fast_dev_run and self.teacher is not None:
            # a smoke run of one batch must not first run the teacher over the whole training set
            log.info("Distillation: fast_dev_run: teacher logits computed online for the batch; cache=%s is not built.", self.cache_path)
        elif self.cache_path is not None:
            self._prepare_cache(trainer, pl_module)
        self._wrap_training_step(pl_module)

    def _add_pseudo_labels(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.utils.data import DataLoader

        dm = trainer.datamodule
        if not (callable(getattr(dm, "unlabeled_set", None)) and callable(getattr(dm, "add_pseudo_labels", None))):
            raise ConfigError("pseudo_labels needs a datamodule with unlabeled_set() and add_pseudo_labels(indices, labels) "
                              f"(ours have them); got {type(dm).__name__}.")
        pool = dm.unlabeled_set()
        loader = DataLoader(pool, batch_size=256, shuffle=False, collate_fn=IndexCollate(pool.collate))
        keep, labels, _ = pseudo_label(self.teacher, loader, threshold=self.pseudo_labels, output_fn=self.output_fn,
                                       device=pl_module.device)
        total = dm.add_pseudo_labels(keep, labels)
        self.pseudo_label_stats = {"pool": len(pool), "kept": int(keep.numel()), "train_examples": int(total)}
        log.info("Distillation: teacher pseudo-labelled %d of %d pool examples (confidence >= %.2f); %d training examples.",
                 keep.numel(), len(pool), self.pseudo_labels, total)

    def _bind_student(self, student: nn.Module, replaced: bool = False) -> None:
        """(Re)attach the student-side hooks to the network as it is *now*.

        Another callback may replace the network after this one's ``setup`` (QAT swaps in its
        fake-quant graph; callbacks run in list order), so the hooks are bound again at fit start
        and whenever the student object changes: every callback order works.
        """
        for h in self._student_handles:
            h.remove()
        self._student_handles = [student.register_forward_hook(self._capture.hook, with_kwargs=True)]
        if self.pairs:
            self._hook_layers("student", student, self._student_handles, replaced)
        self._student = student

    def _hook_layers(self, side: str, net: nn.Module, handles: list, replaced: bool = False) -> None:
        names = canonical_modules(net)  # layer names of the plain network also hold under torch.compile / checkpoint wrappers
        for pair in self.pairs:
            name = canonical_name(pair[side])
            if name not in names:
                name = pair[side]
            if name not in names:
                why = (f" The student network is now a {type(net).__name__} (another callback, e.g. QAT, rewrote it; "
                       "fused layers such as BatchNorm no longer exist): map modules that survive the rewrite.") if replaced else ""
                raise ConfigError(
                    f"layers: {side} module {name!r} not found.{did_you_mean(name, names)} "
                    f"({side} modules include {[n for n in names if n][:8]}...){why}"
                )
            store = self._features[side]
            attention = pair["loss"] == "attention_kl"

            def hook(module, args, output, store=store, name=pair[side], attention=attention):
                if not is_recomputing():  # an activation checkpoint re-running the layer in backward
                    store[name] = module_feature(output, attention, name)

            handles.append(names[name].register_forward_hook(hook))
        if any(type(m).__name__ == "OptimizedModule" for m in net.modules()):
            # torch.compile does not guard on hooks added after a graph was captured (they would never
            # fire): drop the captured graphs so the next call traces the layer hooks in.
            torch._dynamo.reset()

    def _current_student(self, pl_module: L.LightningModule) -> nn.Module:
        """The student network, hooks re-bound first if it was replaced since they were attached."""
        student = self.network(pl_module)
        if student is not self._student:
            log.info("Distillation: the student network was replaced (%s -> %s); hooks re-bound.",
                     type(self._student).__name__, type(student).__name__)
            self._bind_student(student, replaced=True)
        return student

    def _build_projections(self, trainer: L.Trainer, pl_module: L.LightningModule, student: nn.Module) -> None:
        from lightning_eff.callbacks.common import example_inputs

        inputs = example_inputs(trainer, n=2)
        if inputs is None:
            raise ConfigError("intermediate-layer distillation needs example inputs (a datamodule) to size its projections.")
        with torch.no_grad():
            was = student.training
            student.eval()
            call_with_inputs(student, inputs)
            student.train(was)
            args, kwargs = self._teacher_args(((), inputs) if isinstance(inputs, dict) else ((inputs,), {}))
            self.teacher(*args, **kwargs)
        projections = nn.ModuleDict()
        for pair in self.pairs:
            s, t = self._features["student"][pair["student"]], self._features["teacher"][pair["teacher"]]
            proj = make_projection(s, t, pair["loss"])
            if proj is not None:
                projections[pair["student"].replace(".", "__")] = proj
        for store in self._features.values():
            store.clear()  # the hooks hold these dicts: clear, never rebind
        if len(projections):
            pl_module.distill_projections = projections

    def _teacher_args(self, call: tuple[tuple, dict]) -> tuple[tuple, dict]:
        return self.teacher_inputs(*call) if self.teacher_inputs is not None else call

    def _prepare_cache(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if getattr(pl_module, "mixup", None) is not None:
            raise ConfigError("Distillation(cache=...) with task.mixup: the cached teacher logits are of unmixed examples, "
                              "the student sees mixed ones. Distil online (cache=null), or set task.mixup=null.")
        if dm is not None and hasattr(dm, "return_index"):
            if getattr(dm, "augment", False) or getattr(dm, "train_transform", None) is not None:
                warnings.warn("Distillation(cache=...): the training data is augmented (data.augment / data.train_transform), "
                              "but cached teacher logits were computed on unaugmented examples; the student sees mismatched "
                              "targets. Distil online (cache=null) to run the teacher on the augmented batches.", stacklevel=2)
            dm.return_index = True
            log.info("Distillation: datamodule switched to index-carrying training batches for the logit cache.")
        path = Path(self.cache_path).expanduser()
        if not path.is_absolute():  # relative to the run's folder (the CLI's run_dir), like Lightning's outputs
            path = Path(trainer.default_root_dir) / path
        self.cache = TeacherLogitCache(path)
        loader = sequential_indexed_loader(trainer)
        labels = dataset_labels(loader.dataset)
        expect = {"num_examples": len(loader.dataset), "labels": labels,
                  "teacher_fingerprint": model_fingerprint(self.teacher) if self.teacher is not None else None}
        if self.cache.exists():
            try:
                self.cache.load(**expect)
                return
            except ConfigError as err:
                if self.teacher is None:
                    raise
                log.warning("Distillation: %s Rebuilding it from the teacher.", err)
        elif self.teacher is None:
            raise ConfigError(f"cache={str(path)!r} does not exist and no teacher was given to build it.")
        strategy = trainer.strategy
        if strategy.is_global_zero:
            device = pl_module.device
            self.teacher.to(device)
            with trainer.precision_plugin.forward_context():  # the autocast the online teacher runs under
                logits = compute_teacher_logits(self.teacher, loader, output_fn=self.output_fn, device=device)
            self.cache.save(logits, teacher_fingerprint=expect["teacher_fingerprint"], labels=labels)
            log.info("Distillation: cached teacher logits for %d examples at %s", logits.shape[0], path)
        strategy.barrier("distillation_cache")
        self.cache.load(**expect)

    def _wrap_training_step(self, pl_module: L.LightningModule) -> None:
        original = pl_module.training_step
        callback = self

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            return callback._distil_step(original, pl_module, batch, *args, **kwargs)

        pl_module.training_step = training_step  # instance attribute: the strategy calls this one
        self._patched = pl_module
        self._original_step = original

    # ------------------------------------------------------------------------------ the step
    def _distil_step(self, original: Callable, pl_module: L.LightningModule, batch: Any, *args: Any, **kwargs: Any) -> Any:
        index = None
        if isinstance(batch, IndexedBatch):
            index, batch = batch.index, batch.batch
        self._current_student(pl_module)
        self._capture.arm()
        for store in self._features.values():
            store.clear()
        try:
            out = original(batch, *args, **kwargs)
        finally:
            self._capture.armed = False
        if out is None:  # the user skipped this batch
            return out
        task = out["loss"] if isinstance(out, Mapping) else out
        if self._capture.calls == 0:
            raise ConfigError(
                f"Distillation: the student network (module_attr={self.module_attr!r}, a "
                f"{type(self.network(pl_module)).__name__}) was not called in training_step; set module_attr to the "
                f"attribute your training_step calls (modules: {module_attributes(pl_module)})."
            )
        if self._capture.calls > 1 and not self._warned_calls:
            log.warning("Distillation: the student ran %d times in one training_step; distilling its first call.",
                        self._capture.calls)
            self._warned_calls = True
        student_logits = self.output_fn(self._capture.output)
        if self.cache is not None:
            if index is None:
                raise ConfigError("Distillation(cache=...) needs batches with example indices: use one of our "
                                  "datamodules or wrap your dataset in lightning_eff.data.indexed.IndexedDataset.")
            teacher_logits = self.cache.lookup(index.to(student_logits.device))
        else:
            teacher_logits = self._run_teacher(student_logits.device)
        check_logit_shapes(student_logits, teacher_logits)
        step = pl_module.trainer.global_step
        total = self._steps(pl_module.trainer)
        temperature = self.temperature(step, total)
        kd = kd_loss(student_logits, teacher_logits, temperature)
        w_task, w_kd = self.task_weight(step, total), self.kd_weight(step, total)
        loss = w_task * task + w_kd * kd
        bs = student_logits.shape[0]
        logs = {"distill/task_loss": task.detach(), "distill/kd_loss": kd.detach(), "distill/temperature": temperature}
        if self.pairs:
            feat = self._feature_loss(pl_module)
            loss = loss + feat
            logs["distill/feature_loss"] = feat.detach()
        if self.log_agreement:
            logs["distill/agreement"] = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
        pl_module.log_dict(logs, batch_size=bs, on_step=True, on_epoch=True)
        self._capture.release()
        for store in self._features.values():
            store.clear()
        if isinstance(out, Mapping):
            return {**out, "loss": loss}
        return loss

    @torch.no_grad()
    def _run_teacher(self, device: torch.device) -> Tensor:
        teacher = self.teacher
        if teacher.training:
            teacher.eval()  # something called .train() on it: a teacher never trains
        if next(teacher.parameters(), torch.empty(0, device=device)).device != device:
            teacher.to(device)
        args, kwargs = self._teacher_args((self._capture.args, self._capture.kwargs))
        return self.output_fn(teacher(*move_data_to_device(args, device), **move_data_to_device(kwargs, device)))

    def _feature_loss(self, pl_module: L.LightningModule) -> Tensor:
        projections = getattr(pl_module, "distill_projections", {})
        mask = self._capture.kwargs.get("attention_mask")
        total = None
        for pair in self.pairs:
            s = self._features["student"].get(pair["student"])
            t = self._features["teacher"].get(pair["teacher"])
            if s is None or t is None:
                missing = pair["student"] if s is None else pair["teacher"]
                raise ConfigError(f"layers: module {missing!r} did not run in this step; map modules on the forward path.")
            key = pair["student"].replace(".", "__")
            proj = projections[key] if key in projections else None
            value = FEATURE_LOSSES[pair["loss"]](s, t, proj, mask)
            pl_module.log(f"distill/{pair['loss']}/{pair['student']}", value.detach(), batch_size=s.shape[0])
            total = pair["weight"] * value if total is None else total + pair["weight"] * value
        return total

    def _steps(self, trainer: L.Trainer) -> float | None:
        if self._total_steps is None:
            try:
                self._total_steps = float(trainer.estimated_stepping_batches)
            except Exception:  # no loaders yet / infinite
                return None
        return self._total_steps

    # ------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._current_student(pl_module)  # every callback's setup (surgery) has run by now
        self._total_steps = None
        if self.teacher is not None:
            self.teacher.to(pl_module.device)
        projections = getattr(pl_module, "distill_projections", None)
        if projections is not None:
            ensure_in_optimizer(trainer, list(projections.parameters()))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.teacher is not None:
            self.teacher.eval()  # fit's train() touches only the LightningModule; make it explicit anyway

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.log_agreement and self.teacher is not None and self.cache is None:
            self._capture.arm()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._capture.armed:
            return
        self._capture.armed = False
        if self._capture.calls == 0:
            return
        student = self.output_fn(self._capture.output)
        teacher = self._run_teacher(student.device)
        if student.shape == teacher.shape:
            agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
            pl_module.log("distill/val_agreement", agree, batch_size=student.shape[0], on_epoch=True, sync_dist=True)
        self._capture.release()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for h in self._handles + self._student_handles:
            h.remove()
        self._handles.clear()
        self._student_handles.clear()
        self._student = None
        if self._patched is not None:
            self._patched.__dict__.pop("training_step", None)
            self._patched = None

    #: the teacher is a reference row of the report, not an artifact of this run: ``Export`` skips it
    exportable = False

    def deployable_models(self) -> dict[str, nn.Module]:
        """The teacher as a row of the end-of-run report, beside the student (``report_teacher``)."""
        if not self.report_teacher or self.teacher is None:
            return {}
        return {"teacher": copy.deepcopy(self.teacher).cpu().eval()}

    def state_dict(self) -> dict[str, Any]:
        if self.save_teacher and self.teacher is not None:
            return {"teacher": {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}}
        if self.save_teacher and self._pending_teacher_state is not None:
            return {"teacher": dict(self._pending_teacher_state)}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "teacher" not in state_dict:
            return
        if self.teacher is not None:
            self.teacher.load_state_dict(state_dict["teacher"])
        else:  # the teacher is built in setup(): keep the weights until then instead of dropping them
            self._pending_teacher_state = dict(state_dict["teacher"])


def _spec_key(spec: Any) -> Any:
    """A teacher spec as a stable, readable part of ``state_key``: a module by its weights' fingerprint."""
    if isinstance(spec, nn.Module):
        return f"{type(spec).__name__}:{model_fingerprint(spec)}"
    if isinstance(spec, Mapping):
        return tuple(sorted((str(k), _spec_key(v)) for k, v in spec.items()))
    return None if spec is None else str(spec)
