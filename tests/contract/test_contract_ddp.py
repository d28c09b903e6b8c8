"""The callback contract under DDP: 2 CPU processes (gloo), every table entry.

The two processes are started once for the whole table (``torch.multiprocessing`` with the ``spawn``
start method, the environment of a ``torchrun`` launch); each then fits every entry in turn with
``strategy="ddp"`` on the process group the first fit opened. Starting processes costs most of a tiny
fit, so one start for all entries keeps this in ``make test``; Lightning's own ``ddp_spawn`` launcher
is exercised by ``tests/test_ddp_combined.py``, ``tests/test_footprint.py`` and ``tests/test_sampling.py``.

Each rank records, from a probe callback placed after the callback under test: at ``on_train_end`` its
parameters, buffers and the callback's ``state_dict()`` (the training state, before any end-of-fit side
effect), at ``on_fit_end`` the callback's rank-0-only results and every file written under the entry's
folder (a ``sys.addaudithook`` in that process sees each ``open`` for writing and each ``os.replace``,
which every atomic write in lightning_eff ends with), then saves all of it to ``<entry>/rank{r}.probe``.
The parent compares: identical state on both ranks, side effects on rank 0 only, each file written once.
A fit that fails ends its process (the other one is stopped with it, never left waiting in a collective)
and the test names the entry and shows the traceback.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port

from .settings import (
    ENTRIES,
    TABLE,
    TOTAL_STEPS,
    assert_same,
    contract_trainer,
)

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

WORLD = 2
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _WriteAudit:
    """Every file this process opens for writing, or moves into place, under ``root`` (in order)."""

    def __init__(self, root: str) -> None:
        self.reset(root)

    def reset(self, root: str) -> None:
        """Watch ``root`` from now on, with no events recorded (one audit hook per process: hooks cannot be removed)."""
        self.root = os.path.realpath(root)
        self.events: list[tuple[str, str]] = []  # (kind, path): "open" / "replace_src" / "replace_dst"

    def _inside(self, path: Any) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return None
        return real if real.startswith(self.root + os.sep) else None

    def __call__(self, event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and (p := self._inside(path)):
                self.events.append(("open", p))
        elif event == "os.rename":  # os.rename and os.replace
            src, dst = self._inside(args[0]), self._inside(args[1])
            if src:
                self.events.append(("replace_src", src))
            if dst:
                self.events.append(("replace_dst", dst))

    def written(self) -> list[str]:
        """Final files written (relative to root), one item per write: temp files moved into place count as their target."""
        moved_away = {p for kind, p in self.events if kind == "replace_src"}
        finals = [p for kind, p in self.events if kind == "replace_dst" or (kind == "open" and p not in moved_away)]
        return [os.path.relpath(p, self.root) for p in finals]


class RankProbe(L.Callback):
    """Records one rank's view for the parent process (see the module docstring)."""

    def __init__(self, entry_name: str, folder: str, audit: _WriteAudit) -> None:
        self.entry_name, self.folder, self._audit = entry_name, folder, audit
        self._record: dict[str, Any] = {}

    def _target(self, trainer: L.Trainer) -> Any:
        cls = TABLE[self.entry_name].cls
        return next(cb for cb in trainer.callbacks if isinstance(cb, cls))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = pl_module.net
        self._record = {
            "rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "wrapper": type(trainer.strategy.model).__name__,
            "params": {k: v.detach().cpu().clone() for k, v in net.named_parameters()},
            "buffers": {k: v.detach().cpu().clone() for k, v in net.named_buffers()},
            "callback_state": self._target(trainer).state_dict(),
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        entry = TABLE[self.entry_name]
        cb = self._target(trainer)
        self._record["rank0_effects"] = entry.rank0_effects(cb) if entry.rank0_effects else None
        self._record["written"] = self._audit.written()
        torch.save(self._record, os.path.join(self.folder, f"rank{trainer.global_rank}.probe"))


def _fit_every_entry(rank: int, port: int, root: str, names: list[str]) -> None:
    """One rank: fit every entry in turn under DDP (the process group of the first fit is reused)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)  # two processes on two cores
    audit = _WriteAudit(root)
    sys.addaudithook(audit)
    for name in names:
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        audit.reset(folder)
        entry = TABLE[name]
        try:
            cb = entry.make(Path(folder))
            trainer = contract_trainer(folder, [cb, RankProbe(name, folder, audit)], strategy="ddp",
                                       accelerator="cpu", devices=WORLD)
            # 64 examples: 32 per rank, 4 steps per epoch, the same 8 steps (and schedules) as the one-process contract
            trainer.fit(entry.model(), datamodule=entry.data(n=64, resumable=False))
        except BaseException:
            Path(folder, f"rank{rank}.error").write_text(traceback.format_exc())
            raise  # ends this process; the launcher stops the other rank


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory, worker_id) -> tuple[Path, str | None]:
    """The 2-process run of every entry, once per test session: under pytest-xdist the first worker that
    needs it runs it (holding a file lock) and the others read its results."""
    if worker_id == "master":  # no xdist: this session's own temp folder
        shared = tmp_path_factory.getbasetemp()
    else:  # every xdist worker's temp folder sits in the session's one
        shared = tmp_path_factory.getbasetemp().parent
    root = shared / "ddp_contract"
    with open(shared / "ddp_contract.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "launch.json"
        if not done.exists():
            root.mkdir(exist_ok=True)
            error = None
            try:
                torch.multiprocessing.start_processes(
                    _fit_every_entry, args=(find_free_network_port(), str(root), [e.name for e in ENTRIES]),
                    nprocs=WORLD, start_method="spawn")
            except Exception as err:  # noqa: BLE001 - reported by the entry it happened in
                error = f"{type(err).__name__}: {err}"
            done.write_text(json.dumps({"error": error}))
        return root, json.loads(done.read_text())["error"]


def _check_entry(entry: Any, folder: Path) -> None:
    r0 = torch.load(folder / "rank0.probe", weights_only=True)
    r1 = torch.load(folder / "rank1.probe", weights_only=True)
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world_size"] == r1["world_size"] == 2
    assert r0["wrapper"] == r1["wrapper"] == "DistributedDataParallel"
    assert r0["global_step"] == r1["global_step"] == TOTAL_STEPS

    # identical callback-relevant state on both ranks
    assert_same(r0["params"], r1["params"], path="parameters rank0 vs rank1")
    if entry.ddp_buffers:
        assert_same(r0["buffers"], r1["buffers"], path="buffers rank0 vs rank1")
    assert_same(r0["callback_state"], r1["callback_state"], path="callback.state_dict() rank0 vs rank1")

    # side effects: rank 0 only, each file exactly once
    assert not r1["written"], f"rank 1 wrote {r1['written']}"
    assert len(r0["written"]) == len(set(r0["written"])), f"rank 0 wrote a file twice: {sorted(r0['written'])}"
    for name in entry.rank0_files:
        assert r0["written"].count(name) == 1, (name, sorted(r0["written"]))
        assert (folder / name).is_file(), name
    if entry.rank0_effects is not None:
        assert r0["rank0_effects"], f"rank 0 produced nothing: {r0['rank0_effects']!r}"
        assert not r1["rank0_effects"], f"rank 1 repeated rank 0's work: {r1['rank0_effects']!r}"
    assert set(r0["written"]) >= set(entry.rank0_files)


@pytest.fixture(params=ENTRIES, ids=[e.name for e in ENTRIES])
def entry(request):
    return request.param


def test_ddp_identical_state_and_rank0_only_side_effects(entry, ddp_runs):
    root, launch_error = ddp_runs
    folder = root / entry.name
    errors = sorted(folder.glob("rank*.error"))
    if errors:
        pytest.fail(f"{entry.name} failed under DDP on {errors[0].stem}:\n{errors[0].read_text()}")
    if not (folder / "rank0.probe").exists() or not (folder / "rank1.probe").exists():
        pytest.fail(f"{entry.name} did not run under DDP: the 2-process run stopped earlier ({launch_error})")
    _check_entry(entry, folder)
