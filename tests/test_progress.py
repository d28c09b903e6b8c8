"""Progress lines: one per epoch and one at the end of training (rank 0), elapsed times (the CLI's stage and report
lines: tests/test_precision.py::test_cli_resolves_once_and_records_it, which runs the CLI anyway)."""
from __future__ import annotations

import logging

import lightning as L
from user_module import UserData, UserModule, user_trainer

from lightning_eff.callbacks import ProgressLog
from lightning_eff.callbacks.progress import format_seconds


def test_one_line_per_epoch_and_one_at_the_end(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_eff")
    L.seed_everything(0, verbose=False)
    user_trainer(tmp_path, [ProgressLog(stage="float", metrics=["val_loss"])], max_epochs=3).fit(UserModule(), datamodule=UserData())
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_eff.progress"]
    epochs = [m for m in lines if " epoch " in m]
    assert [m.split(" done")[0] for m in epochs] == ["float: epoch 1/3", "float: epoch 2/3", "float: epoch 3/3"]
    assert all("since start" in m and "val_loss=" in m for m in epochs)
    assert lines[0].startswith("float: training started (3 epochs, 4 steps per epoch)")
    assert lines[-1].startswith("float: training done in ")


def test_format_seconds():
    assert [format_seconds(s) for s in (5, 150, 7200)] == ["5 s", "2.5 min", "2.0 h"]


class _SSLLike(UserModule):
    """Logs what a pretraining task and a kNN probe log (no train/loss or val/acc of its own)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/ssl_loss", loss.detach(), on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val/knn_acc", 0.5)
        self.log("val/lr_scale", 2.0)  # neither a loss nor an accuracy: not shown


def test_default_lines_show_a_tasks_own_losses_and_accuracies(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning_eff")
    L.seed_everything(0, verbose=False)
    user_trainer(tmp_path, [ProgressLog(stage="simclr")], max_epochs=1).fit(_SSLLike(), datamodule=UserData())
    (line,) = [r.getMessage() for r in caplog.records if r.name == "lightning_eff.progress" and " epoch " in r.getMessage()]
    assert "train/ssl_loss=" in line and "val/knn_acc=0.5" in line and "lr_scale" not in line, line
    assert "_step" not in line and "_epoch" not in line
