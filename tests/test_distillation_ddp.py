"""Distillation under DDP (2 CPU processes, gloo): the teacher stays out of the DDP wrapper and the optimizer,
identical on every rank, and the students stay in sync."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from test_distillation_callback import Data, UserModule, _teacher

from lightning_eff.callbacks import Distillation


class Probe(L.Callback):
    """Each rank records what DDP wraps, the teacher's state and the student's weights."""

    def __init__(self, distill: Distillation, folder: str):
        self.distill, self.folder = distill, folder

    def on_train_end(self, trainer, pl_module):
        wrapped = trainer.strategy.model  # the DistributedDataParallel wrapper
        wrapped_ids = {id(p) for p in wrapped.parameters()}
        teacher = self.distill.teacher
        torch.save({
            "teacher_in_ddp": any(id(p) in wrapped_ids for p in teacher.parameters()),
            "teacher_in_optimizer": any(id(p) in {id(t) for t in teacher.parameters()}
                                        for g in trainer.optimizers[0].param_groups for p in g["params"]),
            "teacher_training": teacher.training,
            "wrapper": type(wrapped).__name__,
            "teacher": {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
            "student": {k: v.detach().cpu() for k, v in pl_module.net.state_dict().items()},
        }, f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_ddp_teacher_outside_wrapper_and_students_in_sync(tmp_path):
    torch.set_num_threads(1)
    L.seed_everything(0)
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill = Distillation(teacher=teacher, module_attr="net", kd_weight=0.7, task_weight=0.3)
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=3,
                        limit_val_batches=0, callbacks=[distill, Probe(distill, str(tmp_path))], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(UserModule(), datamodule=Data())
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for r in (r0, r1):
        assert r["wrapper"] == "DistributedDataParallel"
        assert not r["teacher_in_ddp"] and not r["teacher_in_optimizer"] and not r["teacher"] is None
        assert r["teacher_training"] is False
        for k, v in before.items():
            assert torch.equal(r["teacher"][k], v), k
    for k in r0["student"]:
        assert torch.equal(r0["student"][k], r1["student"][k]), k
