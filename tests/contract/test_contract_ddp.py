"""The callback contract under DDP: 2 CPU processes (``ddp_spawn``, gloo), every table entry.

Each rank records, from a probe callback placed after the callback under test: at ``on_train_end`` its
parameters, buffers and the callback's ``state_dict()`` (the training state, before any end-of-fit side
effect), at ``on_fit_end`` the callback's rank-0-only results and every file it wrote itself (a
``sys.addaudithook`` in that process sees each ``open`` for writing and each ``os.replace``, which every
atomic write in lightning_eff ends with), then saves all of it to ``rank{r}.pt``. The parent compares:
identical state on both ranks, side effects on rank 0 only, each file written exactly once.

Same approach as ``tests/test_ddp_combined.py`` (per-rank files).
"""
from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import pytest
import torch

from .settings import (
    ENTRIES,
    TABLE,
    TOTAL_STEPS,
    Entry,
    assert_same,
    contract_trainer,
)

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _WriteAudit:
    """Every file this process opens for writing, or moves into place, under ``root`` (in order)."""

    def __init__(self, root: str) -> None:
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

    def __init__(self, entry_name: str, folder: str) -> None:
        self.entry_name, self.folder = entry_name, folder
        self._audit: _WriteAudit | None = None
        self._record: dict[str, Any] = {}

    def _target(self, trainer: L.Trainer) -> Any:
        cls = TABLE[self.entry_name].cls
        return next(cb for cb in trainer.callbacks if isinstance(cb, cls))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.set_num_threads(1)  # two processes on two cores
        if self._audit is None:
            self._audit = _WriteAudit(self.folder)
            sys.addaudithook(self._audit)  # this process only; it ends with the fit

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
        self._record["written"] = self._audit.written() if self._audit else []
        torch.save(self._record, os.path.join(self.folder, f"rank{trainer.global_rank}.probe"))


@pytest.fixture(params=ENTRIES, ids=[e.name for e in ENTRIES])
def entry(request) -> Entry:
    return request.param


def test_ddp_identical_state_and_rank0_only_side_effects(entry, tmp_path):
    cb = entry.make(tmp_path)
    trainer = contract_trainer(tmp_path, [cb, RankProbe(entry.name, str(tmp_path))], strategy="ddp_spawn",
                               accelerator="cpu", devices=2)
    # 64 examples: 32 per rank, 4 steps per epoch, the same 8 steps (and schedules) as the one-process contract
    trainer.fit(entry.model(), datamodule=entry.data(n=64, resumable=False))
    r0 = torch.load(tmp_path / "rank0.probe", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.probe", weights_only=True)
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
        assert (tmp_path / name).is_file(), name
    if entry.rank0_effects is not None:
        assert r0["rank0_effects"], f"rank 0 produced nothing: {r0['rank0_effects']!r}"
        assert not r1["rank0_effects"], f"rank 1 repeated rank 0's work: {r1['rank0_effects']!r}"
    assert set(r0["written"]) >= set(entry.rank0_files)
