"""The settings table of the callback contract: one :class:`Entry` per public callback.

Each entry gives the callback's options (``kwargs``; nested ``{"_target_": ...}`` values are objects a
Hydra config would build, e.g. the teacher), one bad option and the option name its ``ConfigError``
must name, a second instance's options (coexistence), what the callback produces at the end of fit
(compared between an uninterrupted and a crashed-and-resumed run), how a checkpoint is loaded into a
fresh module, and its DDP expectations (which state is identical on both ranks, which files only rank 0
writes). The tiny model, data and trainer every entry shares are here too (built on ``tests/user_module.py``).

Run shape (every entry): :class:`~user_module.UserModule` (network in ``self.net``), 32 fixed 12x12 images
in 4 batches of 8, 2 epochs = 8 optimizer steps, 2 validation batches per epoch and Lightning's default
2-batch sanity check. The resume test checkpoints every ``CKPT_EVERY`` steps, crashes at ``CRASH_AT`` and
resumes from the step-3 checkpoint: mid-epoch 0 (the loader is resumable), before the first validation
and before every schedule below has finished. Schedules are placed inside those 8 steps.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from user_module import UserData, UserModule, UserNet, user_trainer

import lightning_eff.callbacks

__all__ = [
    "CKPT_EVERY",
    "CRASH_AT",
    "ENTRIES",
    "EPOCHS",
    "RESUME_STEP",
    "STEPS_PER_EPOCH",
    "TABLE",
    "TOTAL_STEPS",
    "CrashAt",
    "Entry",
    "ResumableLoader",
    "SimulatedCrash",
    "TinyData",
    "assert_same",
    "contract_trainer",
    "resolve",
    "tensor_state",
    "tiny_module",
    "tiny_teacher",
]

STEPS_PER_EPOCH = 4  # 32 examples, batch 8
EPOCHS = 2
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
CKPT_EVERY = 3  # ModelCheckpoint(every_n_train_steps=3) in the interrupted run
CRASH_AT = 5  # the interrupted run raises in on_train_batch_end at global_step 5 (before the step-6 checkpoint)
RESUME_STEP = 3  # the checkpoint it resumes from: mid-epoch 0, before the first validation


# ------------------------------------------------------------------ tiny model, data, trainer
def tiny_module() -> UserModule:
    """A user-style LightningModule (network in ``self.net``), seeded: every call gives the same weights."""
    torch.manual_seed(0)
    return UserModule(lr=0.1)


def tiny_teacher() -> nn.Module:
    """A fixed (seeded) teacher network for Distillation, other weights than the student."""
    torch.manual_seed(1)
    return UserNet().eval()


def tiny_teacher_b() -> nn.Module:
    """A second teacher (another seed), for two Distillation instances in one Trainer."""
    torch.manual_seed(2)
    return UserNet().eval()


def _batches_done(trainer: L.Trainer | None) -> int:
    """Batches of the current epoch already trained (0 at an epoch boundary)."""
    if trainer is None or not trainer.num_training_batches:
        return 0
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return int(done % trainer.num_training_batches)


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can resume mid-epoch: its first iteration skips the batches already trained.

    Lightning restores a mid-epoch checkpoint's batch index but restarts a plain DataLoader at its first
    batch (with a warning), so the resumed run would train on other batches than the uninterrupted one.
    The count comes from the trainer's progress (the loader itself runs one batch ahead: Lightning
    prefetches). It implements Lightning's loader ``state_dict`` / ``load_state_dict`` (no warning), but the
    count that matters reaches it through :class:`TinyData`'s own state: Lightning applies a loader's state
    only when the train loader is set up after the loops are restored, and ``trainer.estimated_stepping_batches``
    in ``on_fit_start`` (Pruning) or ``configure_optimizers`` sets it up before — the loader's state is then
    silently never loaded (Lightning 2.6, ``_FitLoop.setup_data`` returns early; upstream issue
    Lightning-AI/pytorch-lightning#20550, open). A datamodule's state is restored before any hook runs.
    """

    def __init__(self, *args: Any, datamodule: TinyData, skip: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._datamodule = datamodule
        self._skip = skip

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": _batches_done(self._datamodule.trainer)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._skip = int(state_dict["batches_done"])  # the same count TinyData restored: set, not added

    def __iter__(self):
        iterator = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(iterator)
        return iterator


class TinyData(UserData):
    """``UserData``'s fixed tensors (12x12, 10 classes, no shuffling): 32 train examples (4 batches of 8),
    16 validation/test examples. ``resumable=True``: a checkpoint saved mid-epoch resumes at the next batch
    (see :class:`ResumableLoader`); DDP runs use the plain loader (Lightning re-creates it with a DistributedSampler)."""

    def __init__(self, n: int = 32, resumable: bool = True) -> None:
        super().__init__(n=n, batch_size=8, size=12)
        self.resumable = resumable
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": _batches_done(self.trainer)} if self.resumable else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._skip = int(state_dict.get("batches_done", 0))

    def train_dataloader(self):
        dataset = TensorDataset(self.x, self.y)
        if not self.resumable:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
        skip, self._skip = self._skip, 0  # the training loader only: calibration loaders (PTQ, Export) start at 0
        return ResumableLoader(dataset, batch_size=self.batch_size, shuffle=False, datamodule=self, skip=skip)


def contract_trainer(root: str | Path, callbacks: list, **kw: Any) -> L.Trainer:
    """``user_trainer`` for the contract: 2 epochs of 4 steps, no logger/progress bar/summary/checkpointing."""
    defaults = dict(max_epochs=EPOCHS, limit_train_batches=None, limit_val_batches=None, limit_test_batches=None)
    defaults.update(kw)
    return user_trainer(root, callbacks, **defaults)


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAt`: the interrupted run's failure."""


class CrashAt(L.Callback):
    """Fail a fit at ``on_train_batch_end`` of global step ``step`` (a real mid-training crash)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"simulated crash at global_step {self.step}")


# ------------------------------------------------------------------ building from kwargs / Hydra nodes
def resolve(value: Any) -> Any:
    """Direct construction of nested ``{"_target_": "pkg.factory", **kwargs}`` values (what Hydra builds)."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            module, _, name = str(value["_target_"]).rpartition(".")
            target = getattr(importlib.import_module(module), name)
            return target(**{k: resolve(v) for k, v in value.items() if k != "_target_"})
        return {k: resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v) for v in value]
    return value


def _format(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value.replace("{root}", root)
    if isinstance(value, Mapping):
        return {k: _format(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_format(v, root) for v in value]
    return value


# ------------------------------------------------------------------ what a callback produces at fit end
def tensor_state(module: nn.Module) -> dict[str, Any]:
    """``state_dict`` of a (possibly int8) model with every tensor detached on CPU."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}


def _int8_models(cb: Any, trainer: L.Trainer) -> dict[str, Any]:
    return {name: tensor_state(model) for name, model in sorted(cb.deployable_models().items())}


def _artifact_files(cb: Any, trainer: L.Trainer) -> dict[str, Any]:
    """Every file an ``artifacts()`` entry names, loaded (paths relative to the run folder; timings left out)."""
    out = {}
    root = Path(trainer.default_root_dir)
    for entry in cb.artifacts():
        path = Path(entry["path"])
        if entry["format"] == "pt":  # Export's TorchScript: the traced module's tensors
            out[str(path.relative_to(root))] = tensor_state(torch.jit.load(str(path)))
        else:  # Pruning's bitmask file, WeightOnlyQuantization's packed codes: plain torch.save payloads
            out[str(path.relative_to(root))] = torch.load(path, weights_only=True)
    return out


def _footprint_file(cb: Any, trainer: L.Trainer) -> dict[str, Any]:
    return {"results.json": json.loads(Path(cb.path).read_text())}


# ------------------------------------------------------------------ post-fit checks ("fit runs")
def _pruning_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert cb.pruner.sparsity == pytest.approx(0.5), cb.pruner.sparsity
    assert cb.masks, "no masks"
    params = dict(module.net.named_parameters())
    for name, mask in cb.masks.items():
        assert bool((params[name].detach()[~mask.to(params[name].device)] == 0).all()), name
    assert [a["path"] for a in cb.artifacts()] and all(Path(a["path"]).exists() for a in cb.artifacts())


def _qat_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert isinstance(module.net, torch.fx.GraphModule) and module.net is cb.prepared_model
    assert sorted(cb.deployable_models()) == ["qat_int8_x86"]


def _ptq_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert type(module.net) is UserNet  # the trained network is untouched: PTQ quantizes a copy
    models = cb.deployable_models()
    assert sorted(models) == ["ptq_int8_x86"]
    assert any(v.is_quantized for v in models["ptq_int8_x86"].state_dict().values() if isinstance(v, torch.Tensor))


def _woq_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert [a["variant"] for a in cb.artifacts()] == ["weight_only_int8", "weight_only_int4"]
    assert all(Path(a["path"]).exists() and a["bytes_ratio"] < 1.0 for a in cb.artifacts())


def _export_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    arts = cb.artifacts()
    assert [(a["variant"], a["format"], a.get("verified")) for a in arts] == [("fp32", "pt", True)], arts


def _footprint_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert cb.report["footprint"]["params"] == sum(p.numel() for p in module.net.parameters())
    assert cb.path is not None and cb.path.exists()


def _distillation_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert torch.isfinite(trainer.callback_metrics["distill/kd_loss"])
    for k, v in tiny_teacher().state_dict().items():  # the teacher never trains
        assert torch.equal(cb.teacher.state_dict()[k], v), k


def _checkpointing_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert cb.info is not None and cb.info.method == "wrapper" and cb.info.modules == ["conv", "bn", "conv2", "bn2"], cb.info
    assert type(module.net.conv) is nn.Conv2d, "the network is restored when training ends"
    assert int(module.net.bn.num_batches_tracked) == TOTAL_STEPS, "BatchNorm updated once per step, not twice"


def _compile_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert cb._compiled is None and getattr(module.net, "_compiled_call_impl", None) is None, "un-compiled after training"


def _channels_last_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert module.net.conv.weight.is_contiguous(), "NCHW again when training ends"
    assert not cb._handles, "the input hook is removed when training ends"


def _knn_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert 0.0 <= cb.last["val"] <= 1.0 and "val/knn_acc" in trainer.callback_metrics


def _allocator_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    from lightning_eff.training.allocator import allocator_facts, tuned_thresholds

    facts = allocator_facts()
    applies = facts["libc"] is not None and facts["preloaded"] is None
    assert cb.result is not None and cb.result["mode"] == "auto" and cb.result["applied"] is applies, cb.result
    assert not applies or tuned_thresholds() == cb.result["thresholds"]  # this process runs with them


def _progress_after_fit(cb: Any, module: L.LightningModule, trainer: L.Trainer) -> None:
    assert cb._fit_start is not None and cb._epoch_start is not None  # its lines: tests/test_progress.py


# ------------------------------------------------------------------ the table
@dataclasses.dataclass(frozen=True)
class Entry:
    """One public callback's contract settings (see the module docstring)."""

    name: str  # the class name in lightning_eff.callbacks.__all__
    kwargs: dict[str, Any]  # plain values; nested {"_target_": ...} nodes are objects (built by resolve() / Hydra)
    bad: tuple[dict[str, Any], str]  # (options merged into kwargs, the option name the ConfigError must name)
    after_fit: Callable[[Any, L.LightningModule, L.Trainer], None]  # what "fit runs" checks beyond finishing
    # A second instance with other options (overrides of kwargs; "{root}" is the run folder), or None with
    # second_reason when two instances on one network are meaningless: then refused_second (overrides giving
    # another state_key) must be refused at fit with a ConfigError matching refused_match.
    second: dict[str, Any] | None = None
    second_reason: str = ""
    refused_second: dict[str, Any] | None = None
    refused_match: str = ""
    # Resume: every state_dict tensor of the LightningModule, the callback's state_dict() and outputs(cb, trainer)
    # (what it produced at the end of fit) must match the uninterrupted run; exact unless stated.
    outputs: Callable[[Any, L.Trainer], dict[str, Any]] | None = None
    rtol: float = 0.0
    atol: float = 0.0
    tolerance_reason: str = "exact: CPU, one thread, fixed data order, the same ops in the same order"
    # How a checkpoint reaches a fresh module: "load_from_checkpoint" (UserModule.load_from_checkpoint), or
    # "trainer" (a Trainer with a fresh callback, then validate(ckpt_path=...)), with the reason.
    load: str = "load_from_checkpoint"
    load_reason: str = "the callback leaves the network's structure alone: the float module class loads the checkpoint"
    # DDP: parameters and the callback's training state are compared on both ranks always; buffers only
    # when ddp_buffers (BatchNorm running statistics are per rank between DDP's buffer broadcasts).
    ddp_buffers: bool = False
    ddp_reason: str = "BatchNorm running statistics are updated per rank after DDP's last buffer broadcast"
    rank0_files: tuple[str, ...] = ()  # files (relative to default_root_dir) written exactly once, by rank 0
    rank0_effects: Callable[[Any], Any] | None = None  # in-memory results that only rank 0 computes
    model: Callable[[], L.LightningModule] = tiny_module  # the LightningModule factory (network in .net)
    data: Callable[..., L.LightningDataModule] = TinyData  # the datamodule factory (fixed tensors)

    @property
    def cls(self) -> type:
        return getattr(lightning_eff.callbacks, self.name)

    @property
    def target(self) -> str:
        return f"lightning_eff.callbacks.{self.name}"

    def options(self, root: str | Path = ".", second: bool = False, **overrides: Any) -> dict[str, Any]:
        opts = {**self.kwargs, **((self.second or {}) if second else {}), **overrides}
        return _format(opts, str(root))

    def make(self, root: str | Path = ".", second: bool = False, **overrides: Any) -> Any:
        """Direct construction (nested ``_target_`` values built by :func:`resolve`)."""
        return self.cls(**resolve(self.options(root, second, **overrides)))

    def node(self, root: str | Path = ".", second: bool = False, **overrides: Any) -> dict[str, Any]:
        """The Hydra node: ``_target_`` plus the same options."""
        return {"_target_": self.target, **self.options(root, second, **overrides)}


ENTRIES: list[Entry] = [
    Entry(
        name="Pruning",
        # taylor saliency (|w·g|) reads gradients, polynomial schedule updating masks every step until step 6:
        # the resume point (step 3) is mid-schedule.
        kwargs=dict(amount=0.5, schedule="polynomial", frequency=1, end_step=6, saliency="taylor",
                    include=["conv", "conv2"], module_attr="net"),
        bad=({"amount": 1.5}, "amount"),
        after_fit=_pruning_after_fit,
        second={"include": ["fc"], "amount": 0.25, "export_sparse": None},
        outputs=_artifact_files,
        rank0_files=("pruning/sparse_fp32.pt",),
        rank0_effects=lambda cb: cb.artifacts(),
    ),
    Entry(
        name="QuantizationAwareTraining",
        # fake quant from step 2, BN statistics frozen at 5, observers at 6: all after the resume point.
        kwargs=dict(engines=["x86"], start_step=2, freeze_bn_step=5, freeze_observer_step=6, module_attr="net"),
        bad=({"observer": "minmaxx"}, "observer"),
        after_fit=_qat_after_fit,
        second=None,
        second_reason=("two QATs on one network are meaningless (the second would fake-quantize the first's "
                       "fake-quant graph); the test asserts distinct state_keys and that the second is refused"),
        refused_second={"engines": ["qnnpack"]},
        refused_match="already prepared for quantization-aware training",
        outputs=_int8_models,
        load="trainer",
        load_reason=("QAT rewrites the network into an FX GraphModule (fused conv-bn, observers) in setup(); the float "
                     "UserModule class cannot hold that state (load_from_checkpoint: missing/unexpected keys). A Trainer "
                     "with a fresh QAT callback prepares the fresh module in setup(), then restores the checkpoint "
                     "(fit/validate/test(ckpt_path=...))"),
        ddp_buffers=True,
        ddp_reason=("BN statistics and observers are frozen at steps 5/6 of 8: after DDP's next buffer broadcast "
                    "every rank holds rank 0's, so all buffers (scales, zero points, ranges) must be identical"),
        rank0_effects=lambda cb: sorted(cb._converted),  # convert_on_fit_end: rank 0 only
    ),
    Entry(
        name="PostTrainingQuantization",
        kwargs=dict(engines=["x86"], calibration_batches=2, module_attr="net"),
        bad=({"calibration_batches": 0}, "calibration_batches"),
        after_fit=_ptq_after_fit,
        second={"mode": "dynamic"},
        outputs=_int8_models,
        rank0_effects=lambda cb: sorted(cb._models),  # quantized at fit end on rank 0 only
    ),
    Entry(
        name="WeightOnlyQuantization",
        kwargs=dict(bits=[8, 4], verify_examples=4, module_attr="net"),
        bad=({"scheme": "asym"}, "scheme"),
        after_fit=_woq_after_fit,
        second={"bits": [2], "scheme": "symmetric"},
        outputs=_artifact_files,
        rank0_files=("weight_only/weight_only_int8.pt", "weight_only/weight_only_int4.pt"),
        rank0_effects=lambda cb: [a["variant"] for a in cb.artifacts()],
    ),
    Entry(
        name="Export",
        kwargs=dict(formats=["pt"], latency=False, verify_examples=4, module_attr="net"),
        bad=({"formats": ["tflite"]}, "formats"),
        after_fit=_export_after_fit,
        second={"output_dir": "{root}/artifacts2", "include_float": True, "verify": False},
        outputs=_artifact_files,
        rank0_files=("artifacts/fp32.pt",),
        rank0_effects=lambda cb: [(a["variant"], a["format"]) for a in cb.artifacts()],
    ),
    Entry(
        name="FootprintMonitor",
        # latency and memory off: timings are not reproducible, and they are the slow part
        kwargs=dict(batch_sizes=[1], latency=False, memory=False, warmup=0, repeats=1, module_attr="net"),
        bad=({"repeats": 0}, "repeats"),
        after_fit=_footprint_after_fit,
        second={"filename": "footprint2.json"},
        outputs=_footprint_file,
        rank0_files=("results.json",),
        rank0_effects=lambda cb: cb.report,
    ),
    Entry(
        name="Distillation",
        # temperature schedule over the 8 steps (4 -> 1): the step drives the loss, so a resumed run that
        # got the step wrong would diverge. save_teacher: the callback has its own checkpoint state.
        kwargs=dict(teacher={"_target_": "contract.settings.tiny_teacher"},
                    temperature={"start": 4.0, "end": 1.0, "end_step": TOTAL_STEPS}, kd_weight=0.7, task_weight=0.3,
                    save_teacher=True, report_teacher=False, module_attr="net"),
        bad=({"kd_weight": 2.0}, "kd_weight"),
        after_fit=_distillation_after_fit,
        second={"teacher": {"_target_": "contract.settings.tiny_teacher_b"}, "kd_weight": 0.5, "task_weight": 0.5},
    ),
    Entry(
        name="ActivationCheckpointing",
        # UserNet is flat (no block list for "auto"): each conv and BN is its own region, so BN's state restore runs.
        kwargs=dict(modules="auto", module_types=["Conv2d", "BatchNorm2d"], module_attr="net"),
        bad=({"use_model_switch": "sometimes"}, "use_model_switch"),
        after_fit=_checkpointing_after_fit,
        second={"module_types": ["Linear"]},
    ),
    Entry(
        name="Compile",
        kwargs=dict(backend="eager", module_attr="net"),  # inductor compiles for minutes on CPU; eager runs dynamo only
        bad=({"backend": "inductorr"}, "backend"),
        after_fit=_compile_after_fit,
        second=None,
        second_reason="compiling a network twice is meaningless: the second Compile is refused",
        refused_second={"backend": "aot_eager"},
        refused_match="already compiled",
    ),
    Entry(
        name="ChannelsLast",
        kwargs=dict(module_attr="net"),
        bad=({"inputs": "yes"}, "inputs"),
        after_fit=_channels_last_after_fit,
        second=None,
        second_reason="one network has one memory layout: a second ChannelsLast is refused",
        refused_second={"inputs": False},
        refused_match="already converted",
    ),
    Entry(
        name="KNNMonitor",
        kwargs=dict(bank_size=32, query_size=16, k=3, module_attr="net"),  # UserNet: the input of its last Linear
        bad=({"k": 0}, "k"),
        after_fit=_knn_after_fit,
        second={"k": 5},
        outputs=lambda cb, trainer: dict(cb.last),  # the last probe's accuracy: the same after a resume
    ),
    Entry(
        name="CPUAllocator",
        kwargs=dict(mode="auto"),  # a per-process setting (page faults: tests/test_allocator.py); the network is untouched
        bad=({"mode": "fastest"}, "mode"),
        after_fit=_allocator_after_fit,
        second={"trim_threshold_mb": 512},
    ),
    Entry(
        name="ProgressLog",
        kwargs=dict(stage="fit"),
        bad=({"metrics": {"val/acc": 1}}, "metrics"),
        after_fit=_progress_after_fit,
        second={"stage": "finetune", "metrics": ["val_loss"]},
        # NHWC convolutions sum in another order than NCHW ones: the resumed run (converted again at its start)
        # and the uninterrupted one use the same kernels, so they still agree exactly.
    ),
]

TABLE: dict[str, Entry] = {e.name: e for e in ENTRIES}


# ------------------------------------------------------------------ comparing states
def assert_same(expected: Any, got: Any, rtol: float = 0.0, atol: float = 0.0, path: str = "", public_only: bool = False,
                _seen: set | None = None) -> None:
    """Recursive equality with tensor tolerance; containers must have the same type and keys.

    Quantized tensors compare their integer codes, scales and zero points. Objects compare their type
    and attributes (``public_only``: names without a leading underscore), modules their state_dict,
    functions by identity.
    """
    seen = set() if _seen is None else _seen
    where = path or "<root>"
    if isinstance(expected, torch.Tensor) or isinstance(got, torch.Tensor):
        assert isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor), f"{where}: {type(expected)} vs {type(got)}"
        assert expected.dtype == got.dtype and expected.shape == got.shape, f"{where}: {expected.dtype}{tuple(expected.shape)} vs {got.dtype}{tuple(got.shape)}"
        if expected.is_quantized:
            assert expected.qscheme() == got.qscheme(), where
            assert torch.equal(expected.int_repr(), got.int_repr()), f"{where}: int8 codes differ"
            assert torch.equal(expected.dequantize(), got.dequantize()), f"{where}: scales / zero points differ"
            return
        e, g = expected.detach().cpu(), got.detach().cpu()
        if rtol == 0 and atol == 0 or not e.is_floating_point():
            assert torch.equal(e, g), f"{where}: max abs diff {(e.double() - g.double()).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}")
        return
    if isinstance(expected, float) and isinstance(got, float):
        if math.isnan(expected) and math.isnan(got):
            return
        assert math.isclose(expected, got, rel_tol=rtol, abs_tol=atol), f"{where}: {expected!r} vs {got!r}"
        return
    plain_dicts = isinstance(expected, dict) and isinstance(got, dict)  # dict / OrderedDict (state_dicts); not DictConfig
    assert plain_dicts or type(expected) is type(got), f"{where}: {type(expected).__name__} vs {type(got).__name__}"
    if isinstance(expected, Mapping):
        assert set(expected) == set(got), f"{where}: keys {sorted(map(str, expected))} vs {sorted(map(str, got))}"
        for k in expected:
            assert_same(expected[k], got[k], rtol, atol, f"{path}[{k!r}]", public_only, seen)
        return
    if isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), f"{where}: length {len(expected)} vs {len(got)}"
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_same(a, b, rtol, atol, f"{path}[{i}]", public_only, seen)
        return
    if isinstance(expected, nn.Module):
        assert_same(tensor_state(expected), tensor_state(got), rtol, atol, f"{path}.state_dict()", public_only, seen)
        return
    if isinstance(expected, (types.FunctionType, types.BuiltinFunctionType, type)):
        assert expected is got, f"{where}: {expected!r} is not {got!r}"
        return
    if isinstance(expected, types.MethodType):  # a stored bound method: the same function (its instance differs)
        assert expected.__func__ is got.__func__, f"{where}: {expected!r} vs {got!r}"
        return
    if hasattr(expected, "__dict__") and not isinstance(expected, Path):
        if (id(expected), id(got)) in seen:
            return
        seen.add((id(expected), id(got)))
        a = {k: v for k, v in vars(expected).items() if not (public_only and k.startswith("_"))}
        b = {k: v for k, v in vars(got).items() if not (public_only and k.startswith("_"))}
        assert_same(a, b, rtol, atol, f"{path}.__dict__", public_only, seen)
        return
    assert expected == got, f"{where}: {expected!r} vs {got!r}"
