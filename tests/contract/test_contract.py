"""The callback contract, one process: every public callback of ``lightning_eff.callbacks`` passes the same tests.

Parametrized over :data:`contract.settings.ENTRIES`. Three fits per entry are shared by the tests that read
them (cached per test module): an uninterrupted run, a run that crashes at step ``CRASH_AT`` after writing a
checkpoint every ``CKPT_EVERY`` steps, and a fresh module + fresh callback + new Trainer resumed from that
run's step-3 checkpoint (``fit(ckpt_path=...)``, mid-epoch, mid-schedule).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import OmegaConf
from user_module import UserModule

import lightning_eff
import lightning_eff.callbacks
from lightning_eff.callbacks.base import EffCallback
from lightning_eff.errors import ConfigError

from .settings import (
    CKPT_EVERY,
    CRASH_AT,
    ENTRIES,
    RESUME_STEP,
    TABLE,
    TOTAL_STEPS,
    CrashAt,
    Entry,
    SimulatedCrash,
    assert_same,
    contract_trainer,
    tensor_state,
)

# The resumed Trainer has no ModelCheckpoint (the uninterrupted run has none either): Lightning notes that the
# checkpoint carries one's state. Expected here, not a problem.
pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")


@pytest.fixture(params=ENTRIES, ids=[e.name for e in ENTRIES])
def entry(request) -> Entry:
    return request.param


def _stateful(cb: L.Callback) -> bool:
    """Lightning keys a callback in the checkpoint (and refuses duplicate state_keys) when it overrides state_dict."""
    return is_overridden("state_dict", instance=cb, parent=L.Callback)


# ------------------------------------------------------------------ the shared runs
@dataclasses.dataclass
class Run:
    module: L.LightningModule
    callback: Any
    trainer: L.Trainer
    root: Path


class Runs:
    """The three fits of one entry, computed on first use."""

    def __init__(self, entry: Entry, root: Path) -> None:
        self.entry, self.root = entry, root
        self._full: Run | None = None
        self._resumed: Run | None = None
        self._mid: Path | None = None

    @property
    def full(self) -> Run:
        if self._full is None:
            root = self.root / "full"
            module, cb = self.entry.model(), self.entry.make(root)
            trainer = contract_trainer(root, [cb])
            trainer.fit(module, datamodule=self.entry.data())
            trainer.save_checkpoint(root / "final.ckpt")  # after on_fit_end: the callback's end-of-fit state
            self._full = Run(module, cb, trainer, root)
        return self._full

    @property
    def final_ckpt(self) -> Path:
        return self.full.root / "final.ckpt"

    @property
    def mid_ckpt(self) -> Path:
        """The checkpoint ModelCheckpoint(every_n_train_steps=3) wrote before the run crashed at step 5."""
        if self._mid is None:
            root = self.root / "crash"
            ckpt = ModelCheckpoint(dirpath=str(root / "ckpt"), filename="{step}", every_n_train_steps=CKPT_EVERY, save_top_k=-1)
            trainer = contract_trainer(root, [self.entry.make(root), CrashAt(CRASH_AT), ckpt], enable_checkpointing=True)
            with pytest.raises(SimulatedCrash):
                trainer.fit(self.entry.model(), datamodule=self.entry.data())
            assert trainer.global_step == CRASH_AT
            self._mid = root / "ckpt" / f"step={RESUME_STEP}.ckpt"
        return self._mid

    @property
    def resumed(self) -> Run:
        if self._resumed is None:
            root = self.root / "resumed"
            module, cb = self.entry.model(), self.entry.make(root)  # fresh module, fresh callback, new Trainer
            trainer = contract_trainer(root, [cb])
            trainer.fit(module, datamodule=self.entry.data(), ckpt_path=str(self.mid_ckpt))
            self._resumed = Run(module, cb, trainer, root)
        return self._resumed


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict[str, Runs] = {}

    def get(entry: Entry) -> Runs:
        if entry.name not in cache:
            cache[entry.name] = Runs(entry, tmp_path_factory.mktemp(f"contract-{entry.name}"))
        return cache[entry.name]

    return get


# ------------------------------------------------------------------ 0. the table covers every public callback
def _public_callbacks() -> dict[str, type]:
    names = set(lightning_eff.callbacks.__all__)
    names |= {n for n in dir(lightning_eff.callbacks) if not n.startswith("_")}  # exported without __all__ too
    names |= set(lightning_eff.__all__)  # re-exported at the top level
    found = {}
    for n in names:
        obj = getattr(lightning_eff.callbacks, n, None) or getattr(lightning_eff, n, None)
        if inspect.isclass(obj) and issubclass(obj, L.Callback) and obj is not EffCallback:
            found[n] = obj
    return found


def test_every_public_callback_has_a_table_entry():
    public = _public_callbacks()
    missing = sorted(set(public) - set(TABLE))
    assert not missing, f"public callbacks without a contract entry in tests/contract/settings.py: {missing}"
    stale = sorted(set(TABLE) - set(lightning_eff.callbacks.__all__))
    assert not stale, f"table entries that are not in lightning_eff.callbacks.__all__: {stale}"
    for name in lightning_eff.callbacks.__all__:
        assert issubclass(getattr(lightning_eff.callbacks, name), EffCallback), f"{name} does not inherit EffCallback"
    for e in ENTRIES:  # the table names real options
        params = inspect.signature(e.cls).parameters
        options = {*e.kwargs, *e.bad[0], *(e.second or {}), *(e.refused_second or {})}
        assert options <= set(params), f"{e.name}: not options of the constructor: {sorted(options - set(params))}"
        assert e.bad[1] in params, f"{e.name}: bad option {e.bad[1]!r} is not a constructor option"
        assert (e.second is None) == bool(e.second_reason), f"{e.name}: a second instance, or the reason why not"


# ------------------------------------------------------------------ 1. fit runs
def test_fit_runs(entry, runs):
    run = runs(entry).full
    assert run.trainer.state.finished and run.trainer.global_step == TOTAL_STEPS
    entry.after_fit(run.callback, run.module, run.trainer)


# ------------------------------------------------------------------ 2. crash + resume == uninterrupted
def _metrics(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sorted(trainer.callback_metrics.items())}


def test_resume_after_crash_equals_uninterrupted(entry, runs):
    r = runs(entry)
    mid = torch.load(r.mid_ckpt, weights_only=True)
    assert mid["global_step"] == RESUME_STEP and mid["epoch"] == 0  # mid-epoch, before the first validation
    full, resumed = r.full, r.resumed
    assert resumed.trainer.global_step == full.trainer.global_step == TOTAL_STEPS
    tol = dict(rtol=entry.rtol, atol=entry.atol)
    # every state_dict tensor of the LightningModule: weights, pruning zeros, BN statistics, observers, scales
    assert_same(tensor_state(full.module), tensor_state(resumed.module), path="module.state_dict()", **tol)
    assert_same(full.callback.state_dict(), resumed.callback.state_dict(), path="callback.state_dict()", **tol)
    if entry.outputs is not None:  # what the callback produced at the end of fit (artifacts, int8 models, report)
        assert_same(entry.outputs(full.callback, full.trainer), entry.outputs(resumed.callback, resumed.trainer),
                    path="outputs", **tol)
    metrics = lambda t: {k: v.detach().clone() for k, v in sorted(t.callback_metrics.items())}
    assert_same(metrics(full.trainer), metrics(resumed.trainer), path="callback_metrics", **tol)


# ------------------------------------------------------------------ 3. checkpoints hold no pickled objects
def test_checkpoints_load_with_weights_only(entry, runs):
    r = runs(entry)
    for path in (r.mid_ckpt, r.final_ckpt):  # mid-training (ModelCheckpoint) and after on_fit_end (save_checkpoint)
        ckpt = torch.load(path, weights_only=True)
        cb = r.full.callback
        if _stateful(cb) and cb.state_dict():
            assert cb.state_key in ckpt["callbacks"], (path.name, sorted(ckpt["callbacks"]))
    final = torch.load(r.final_ckpt, weights_only=True)
    if _stateful(r.full.callback) and r.full.callback.state_dict():
        assert_same(r.full.callback.state_dict(), final["callbacks"][r.full.callback.state_key], path="ckpt callback state")


# ------------------------------------------------------------------ 4. a fresh module loads the checkpoint
def test_checkpoint_loads_into_a_fresh_module(entry, runs, tmp_path):
    r = runs(entry)
    ckpt = torch.load(r.final_ckpt, weights_only=True)
    if entry.load == "load_from_checkpoint":
        loaded = UserModule.load_from_checkpoint(str(r.final_ckpt), weights_only=True)
    else:
        assert entry.load == "trainer", entry.load
        # documented: the float class alone cannot hold the rewritten network's state
        with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
            UserModule.load_from_checkpoint(str(r.final_ckpt), weights_only=True)
        loaded = entry.model()
        contract_trainer(tmp_path, [entry.make(tmp_path)]).validate(loaded, datamodule=entry.data(), ckpt_path=str(r.final_ckpt),
                                                                    verbose=False)
    assert_same(ckpt["state_dict"], tensor_state(loaded), path="loaded.state_dict()")
    masks = (ckpt.get("callbacks") or {}).get(r.full.callback.state_key, {}).get("masks")
    if masks:  # pruned weights are zero in the loaded module
        params = dict(loaded.net.named_parameters())
        for name, mask in masks.items():
            assert bool((params[name].detach()[~mask] == 0).all()), name


# ------------------------------------------------------------------ 5. state_dict round trip
def test_state_dict_round_trips_into_a_new_instance(entry, runs):
    state = runs(entry).full.callback.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # through bytes, as a checkpoint would carry it
    buffer.seek(0)
    fresh = entry.make()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same(state, fresh.state_dict(), path="state_dict()")


# ------------------------------------------------------------------ 6. two instances coexist
def test_two_instances_coexist_with_distinct_state_keys(entry, tmp_path):
    first = entry.make(tmp_path)
    if entry.second is None:
        # Two instances are meaningless here (entry.second_reason); another option still gives another state_key,
        # and the second instance must be refused clearly instead of silently stacking on the first.
        assert entry.refused_second is not None and entry.refused_match, entry.second_reason
        other = entry.make(tmp_path, **entry.refused_second)
        assert first.state_key != other.state_key
        with pytest.raises(ConfigError, match=entry.refused_match):
            contract_trainer(tmp_path, [first, other]).fit(entry.model(), datamodule=entry.data())
        return
    second = entry.make(tmp_path, second=True)
    assert first.state_key != second.state_key, first.state_key
    trainer = contract_trainer(tmp_path, [first, second])
    trainer.fit(entry.model(), datamodule=entry.data())
    assert trainer.state.finished and trainer.global_step == TOTAL_STEPS
    trainer.save_checkpoint(tmp_path / "both.ckpt")
    saved = torch.load(tmp_path / "both.ckpt", weights_only=True)["callbacks"]
    for cb in (first, second):
        if _stateful(cb) and cb.state_dict():
            assert_same(cb.state_dict(), saved[cb.state_key], path=f"checkpoint[{cb.state_key!r}]")
    paths = [a["path"] for cb in (first, second) if hasattr(cb, "artifacts") for a in cb.artifacts() if "path" in a]
    paths += [str(cb.path) for cb in (first, second) if getattr(cb, "path", None) is not None]
    assert len(paths) == len(set(paths)), f"the two instances wrote the same files: {paths}"


# ------------------------------------------------------------------ 7. Hydra node == direct construction
def _public(cb: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(cb).items() if not k.startswith("_")}


def test_hydra_node_builds_the_same_callback(entry, tmp_path):
    node = OmegaConf.create(entry.node(tmp_path))  # as a YAML config gives it: ListConfig / DictConfig values
    assert node._target_ == f"lightning_eff.callbacks.{entry.name}"
    built, direct = instantiate(node), entry.make(tmp_path)
    assert type(built) is type(direct) is entry.cls
    assert built.state_key == direct.state_key
    assert_same(_public(direct), _public(built), path=entry.name, public_only=True)
    assert_same(direct.state_dict(), built.state_dict(), path="state_dict()")


# ------------------------------------------------------------------ 8. a bad option names itself
def _names(option: str, message: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(option)}(?![\w])", message) is not None


def test_bad_option_raises_config_error_naming_it(entry, tmp_path):
    bad, option = entry.bad
    with pytest.raises(ConfigError) as err:
        entry.make(tmp_path, **bad)
    assert _names(option, str(err.value)), f"{option!r} not named in: {err.value}"
    with pytest.raises(Exception) as err:  # Hydra wraps it (InstantiationException); the cause is ours
        instantiate(OmegaConf.create(entry.node(tmp_path, **bad)))
    cause: BaseException | None = err.value
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__
    assert isinstance(cause, ConfigError), f"no ConfigError behind {err.value!r}"
    assert _names(option, str(cause)) and _names(option, str(err.value)), str(err.value)
