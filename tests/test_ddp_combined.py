"""Pruning + Distillation + ActivationCheckpointing + FootprintMonitor together under DDP (2 CPU processes, gloo):
the run completes, masks and weights are identical on both ranks, the teacher stays outside the DDP wrapper and the
optimizer (frozen, in eval mode), checkpoint wrappers are active in training, the footprint file is written.

Replaces the earlier one-technique files test_pruning_ddp.py / test_distillation_ddp.py (each callback alone under
DDP is also in the contract suite's DDP test)."""
from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from torch import nn
from user_module import QUIET, UserData, UserModule

from lightning_eff.callbacks import (
    ActivationCheckpointing,
    Distillation,
    FootprintMonitor,
    Pruning,
)

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


class BlockNetModule(UserModule):
    def __init__(self) -> None:
        super().__init__(lr=0.05)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)),
        )


class Record(L.Callback):
    """Each rank saves its masks, weights and what it saw of the teacher and the wrapper."""

    def __init__(self, pruning: Pruning, distill: Distillation, ckpt: ActivationCheckpointing, folder: str) -> None:
        self.pruning, self.distill, self.ckpt, self.folder = pruning, distill, ckpt, folder
        self.wrapped_during_training = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.wrapped_during_training |= any(type(m).__name__ == "CheckpointWrapper" for m in pl_module.net.modules())

    def on_train_end(self, trainer, pl_module) -> None:
        ddp = trainer.strategy.model
        teacher_ids = {id(p) for p in self.distill.teacher.parameters()}
        optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        torch.save({"masks": {k: v.cpu() for k, v in self.pruning.masks.items()},
                    "weights": {k: v.detach().cpu() for k, v in pl_module.net.named_parameters()},
                    "wrapper": type(ddp).__name__,
                    "teacher_in_ddp": any(id(p) in teacher_ids for p in ddp.parameters()),
                    "teacher_in_optimizer": bool(teacher_ids & optimized),
                    "teacher_training": self.distill.teacher.training,
                    "teacher": {k: v.detach().cpu() for k, v in self.distill.teacher.state_dict().items()},
                    "wrapped": self.wrapped_during_training, "checkpointed": list(self.ckpt.info.modules)},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


def test_pruning_distillation_checkpointing_footprint_under_ddp(tmp_path):
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    teacher = copy.deepcopy(BlockNetModule().net).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruning = Pruning(amount=0.5, schedule="polynomial", frequency=1, end_step=3, include=[r"\d\.0"], export_sparse=None,
                      module_attr="net")
    distill = Distillation(teacher=teacher, layers={"1": "1"}, module_attr="net")
    ckpt = ActivationCheckpointing(module_attr="net")
    footprint = FootprintMonitor(batch_sizes=[1], latency=False, memory=False, module_attr="net")
    trainer = L.Trainer(strategy="ddp_spawn", devices=2, max_epochs=1, limit_train_batches=4, limit_val_batches=2,
                        callbacks=[pruning, distill, ckpt, footprint, Record(pruning, distill, ckpt, str(tmp_path))],
                        **{**QUIET, "default_root_dir": str(tmp_path)})
    trainer.fit(BlockNetModule(), datamodule=UserData())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["masks"] and r0["masks"].keys() == r1["masks"].keys()
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    for r in (r0, r1):  # the teacher: outside the DDP wrapper and the optimizer, frozen, in eval mode
        assert r["wrapper"] == "DistributedDataParallel"
        assert not r["teacher_in_ddp"] and not r["teacher_in_optimizer"] and r["teacher_training"] is False
        for k, v in before.items():
            assert torch.equal(r["teacher"][k], v), k
    assert r0["wrapped"] and r1["wrapped"] and r0["checkpointed"] == r1["checkpointed"] == ["0", "1", "2"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["footprint"]["params"] > 0
