"""A LightningModule written outside this project, as a new user would (network in ``self.net``).

Shared by the tests of what users hit with their own modules (``test_user_modules.py``), the contract suite
and the wrapper tests; :func:`quiet_trainer` is the one Trainer every callback test file builds on.
"""
from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eff.data.indexed import IndexedCollate, IndexedDataset


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
    """Fixed random images of 10 classes, no shuffling (two fits see identical batches): the one tiny datamodule.

    Args:
        n: training examples; ``size``: image side (1 channel).
        val: ``"shifted"`` - validation/test images of other statistics (leaks into training state would
            show); ``"train"`` - validation/test are the training tensors.
        indexed: training batches carry each example's index (``IndexedDataset``: offline distillation caches).
    """

    def __init__(self, n: int = 64, batch_size: int = 8, size: int = 12, val: str = "shifted", indexed: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, size, size, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)
        if val == "shifted":
            self.vx = 3 * torch.randn(n // 2, 1, size, size, generator=g) + 1  # other statistics: leaks would show
            self.vy = torch.randint(0, 10, (n // 2,), generator=g)
        elif val == "train":
            self.vx, self.vy = self.x, self.y
        else:
            raise ValueError(f"val={val!r}: choose 'shifted' or 'train'")
        self.batch_size, self.indexed, self.num_classes = batch_size, indexed, 10

    def sample_inputs(self, n: int = 1) -> torch.Tensor:
        return self.x[:n]

    def train_dataloader(self):
        ds = TensorDataset(self.x, self.y)
        if self.indexed:
            return DataLoader(IndexedDataset(ds), batch_size=self.batch_size, shuffle=False, collate_fn=IndexedCollate())
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.vx, self.vy), batch_size=self.batch_size, shuffle=False)

    test_dataloader = predict_dataloader = val_dataloader


def same_as_train(n: int = 48, batch_size: int = 8, indexed: bool = False) -> UserData:
    """16x16 images whose validation/test split is the training set (the callback test files' data)."""
    return UserData(n=n, batch_size=batch_size, size=16, val="train", indexed=indexed)


#: What every test Trainer shares: CPU, no logger, no progress bar, no model summary, no checkpoints.
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", enable_checkpointing=False)


def quiet_trainer(root, callbacks, **kw) -> L.Trainer:
    """The one test Trainer: :data:`QUIET` in ``root``; ``kw`` (each test file's defaults, then the test's) override."""
    return L.Trainer(callbacks=callbacks, **{**QUIET, "default_root_dir": str(root), **kw})


def user_trainer(root, callbacks, **kw) -> L.Trainer:
    return quiet_trainer(root, callbacks, **{**dict(max_epochs=1, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2), **kw})
