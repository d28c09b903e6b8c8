"""A LightningModule written outside this project, as a new user would (network in ``self.net``).

Shared by the tests of what users hit with their own modules (``test_user_modules.py``), the contract suite
and the wrapper tests; :func:`quiet_trainer` is the one Trainer every callback test file builds on.
"""
from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


class UserModule(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = UserNet()
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class UserData(L.LightningDataModule):
    """Fixed tensors, no shuffling (two fits see identical batches); val/test differ from train."""

    def __init__(self, n: int = 64, batch_size: int = 8, size: int = 12) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, size, size, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)
        self.vx = 3 * torch.randn(n // 2, 1, size, size, generator=g) + 1  # other statistics: leaks would show
        self.vy = torch.randint(0, 10, (n // 2,), generator=g)
        self.batch_size = batch_size

    def sample_inputs(self, n: int = 1) -> torch.Tensor:
        return self.x[:n]

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.vx, self.vy), batch_size=self.batch_size, shuffle=False)

    test_dataloader = predict_dataloader = val_dataloader


#: What every test Trainer shares: CPU, no logger, no progress bar, no model summary, no checkpoints.
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", enable_checkpointing=False)


def quiet_trainer(root, callbacks, **kw) -> L.Trainer:
    """The one test Trainer: :data:`QUIET` in ``root``; ``kw`` (each test file's defaults, then the test's) override."""
    return L.Trainer(callbacks=callbacks, **{**QUIET, "default_root_dir": str(root), **kw})


def user_trainer(root, callbacks, **kw) -> L.Trainer:
    return quiet_trainer(root, callbacks, **{**dict(max_epochs=1, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2), **kw})
