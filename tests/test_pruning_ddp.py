"""Pruning under DDP (2 CPU processes, gloo): every rank ends with identical masks and weights."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from test_pruning_callback import TinyTask, _loader

from lightning_eff.callbacks.pruning import Pruning


class SaveMasks(L.Callback):
    """Each rank writes its masks and weights, so the parent process can compare them."""

    def __init__(self, pruning: Pruning, folder: str):
        self.pruning, self.folder = pruning, folder

    def on_train_end(self, trainer, pl_module):
        torch.save({"masks": {k: v.cpu() for k, v in self.pruning.masks.items()},
                    "weights": {k: v.detach().cpu() for k, v in pl_module.model.named_parameters()},  # BN stats are per rank
                    "sparsity": self.pruning.pruner.sparsity},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_ddp_masks_identical_across_ranks(tmp_path):
    torch.set_num_threads(1)
    L.seed_everything(0)
    pruning = Pruning(amount=0.7, schedule="polynomial", frequency=1, end_step=3, saliency="taylor", export_sparse=None)
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=4,
                        callbacks=[pruning, SaveMasks(pruning, str(tmp_path))], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(TinyTask(), _loader())
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["sparsity"] == r1["sparsity"] == pytest.approx(0.7)
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    for k in r0["masks"]:
        assert torch.equal(r0["masks"][k], r1["masks"][k]), k
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
