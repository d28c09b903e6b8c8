"""The Pruning callback in real Lightning fits: zeros stay zero, resume equals uninterrupted, checkpoints load."""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from user_module import quiet_trainer

from lightning_eff.callbacks.pruning import Pruning
from lightning_eff.compression.pruning import load_sparse

torch.set_num_threads(1)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class TinyTask(L.LightningModule):
    def __init__(self, optimizer: str = "sgd"):
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyNet()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _loader(n=64, batch=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(tmp_path, callbacks, max_epochs=2, **kw):
    return quiet_trainer(tmp_path, callbacks, **{**dict(max_epochs=max_epochs, devices=1, deterministic=True, enable_checkpointing=True), **kw})


class ZeroWatcher(L.Callback):
    """After every optimizer step, checks that every masked weight is exactly zero."""

    def __init__(self, pruning):
        self.pruning, self.checked, self.violations = pruning, 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.model.named_parameters())
        for name, mask in self.pruning.masks.items():
            self.checked += 1
            if bool((params[name].detach()[~mask] != 0).any()):
                self.violations += 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("granularity, extra", [("unstructured", {}), ("channel", {}), ("block", {"block": [2, 2]})])
def test_masked_weights_stay_exactly_zero(tmp_path, optimizer, granularity, extra):
    L.seed_everything(0)
    pruning = Pruning(amount=0.6, schedule="polynomial", frequency=2, granularity=granularity, export_sparse=None, **extra)
    watcher = ZeroWatcher(pruning)
    task = TinyTask(optimizer)
    _trainer(tmp_path, [pruning, watcher], enable_checkpointing=False).fit(task, _loader())
    assert watcher.checked > 0 and watcher.violations == 0
    assert pruning.pruner.sparsity == pytest.approx(0.6)
    per, total = pruning.pruner.layer_sparsity()
    assert total > 0.5
    # optimizer state of pruned entries is zero too (momentum / Adam moments never push them back)
    opt = task.trainer.optimizers[0]
    params = dict(task.model.named_parameters())
    for name, mask in pruning.masks.items():
        for v in opt.state[params[name]].values():
            if isinstance(v, torch.Tensor) and v.shape == mask.shape:
                assert bool((v[~mask] == 0).all())


def test_nm_and_gradient_saliencies_train(tmp_path):
    for kwargs in (dict(granularity="nm", schedule="constant", include=["conv2", "fc"]),
                   dict(saliency="taylor", schedule="constant", begin_step=2, amount=0.5),
                   dict(saliency="obd", schedule="rounds", rounds=2, amount=0.75)):
        L.seed_everything(0)
        pruning = Pruning(export_sparse=None, **kwargs)
        watcher = ZeroWatcher(pruning)
        _trainer(tmp_path, [pruning, watcher], enable_checkpointing=False).fit(TinyTask(), _loader())
        assert watcher.violations == 0 and pruning.masks, kwargs
    # the N:M run: exactly 2 of every 4 input weights kept
    L.seed_everything(0)
    pruning = Pruning(granularity="nm", schedule="constant", include=["conv2", "fc"], export_sparse=None)
    task = TinyTask()
    _trainer(tmp_path, [pruning], enable_checkpointing=False).fit(task, _loader())
    fc = task.model.fc.weight.detach()
    assert torch.all((fc.reshape(-1, 4) != 0).sum(dim=1) <= 2)
    assert torch.all(pruning.masks["fc.weight"].reshape(-1, 4).sum(1) == 2)


def _run(tmp_path, max_epochs, ckpt_path=None, **kw):
    L.seed_everything(0)
    pruning = Pruning(amount=0.8, schedule="polynomial", frequency=2, end_step=24, export_sparse=None, **kw)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True,
                           filename="{epoch}")
    task = TinyTask()
    trainer = _trainer(tmp_path, [pruning, ckpt], max_epochs=max_epochs)
    trainer.fit(task, _loader(), ckpt_path=ckpt_path)
    return task, pruning


@pytest.mark.parametrize("kw", [{}, {"saliency": "taylor"}])
def test_resume_mid_schedule_equals_uninterrupted(tmp_path, kw):
    # 8 steps per epoch, schedule ends at step 24: epoch 1's checkpoint (step 16) is mid-schedule.
    full_task, full = _run(tmp_path / "full", 4, **kw)
    _run(tmp_path / "part", 2, **kw)
    ckpt = tmp_path / "part" / "ckpt" / "epoch=1.ckpt"
    state = torch.load(ckpt, weights_only=True)  # plain tensors only
    cb_state = next(v for k, v in state["callbacks"].items() if k.startswith("Pruning"))
    assert 0.0 < cb_state["sparsity"] < 0.8
    resumed_task, resumed = _run(tmp_path / "part", 4, ckpt_path=str(ckpt), **kw)
    assert resumed.pruner.sparsity == full.pruner.sparsity == pytest.approx(0.8)
    assert full.masks.keys() == resumed.masks.keys()
    for k in full.masks:
        assert torch.equal(full.masks[k], resumed.masks[k]), k
    for (k, a), (_, b) in zip(full_task.state_dict().items(), resumed_task.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_loads_into_fresh_model_and_artifact_shrinks(tmp_path):
    L.seed_everything(0)
    pruning = Pruning(amount=0.9, schedule="constant", export_sparse="fp32", output_dir=str(tmp_path / "art"))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    task = TinyTask()
    _trainer(tmp_path, [pruning, ckpt], max_epochs=1).fit(task, _loader())
    loaded = TinyTask.load_from_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"), weights_only=True)
    for name, mask in pruning.masks.items():
        w = dict(loaded.model.named_parameters())[name]
        assert bool((w[~mask] == 0).all())
    # a fresh callback restores the masks from the checkpoint state
    fresh = Pruning(amount=0.9, schedule="constant")
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    fresh.load_state_dict(next(v for k, v in state.items() if k.startswith("Pruning")))
    assert all(torch.equal(fresh.masks[k], pruning.masks[k].cpu()) for k in pruning.masks)
    # compressed artifact: smaller than dense, loads back exactly
    (entry,) = pruning.artifacts()
    assert entry["bytes"] < entry["dense_bytes"] and "latency" in entry and "NO latency" in entry["note"]
    restored = load_sparse(entry["path"], TinyNet())
    for (k, a), (_, b) in zip(task.model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), k


def test_regrowth_moves_weights_at_fixed_sparsity(tmp_path):
    for method in ("rigl", "set"):
        L.seed_everything(0)
        pruning = Pruning(amount=0.7, schedule="constant", regrowth=method, regrowth_interval=2, regrowth_fraction=0.5,
                          export_sparse=None, distribution="uniform")
        snapshots = []

        class Snap(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                snapshots.append({k: v.clone() for k, v in pruning.masks.items()})

        watcher = ZeroWatcher(pruning)
        _trainer(tmp_path, [pruning, Snap(), watcher], enable_checkpointing=False, max_epochs=1).fit(TinyTask(), _loader())
        assert watcher.violations == 0
        counts = {sum(int(m.sum()) for m in s.values()) for s in snapshots}
        assert len(counts) == 1, f"{method}: the number of live weights changed: {counts}"
        changed = any(not torch.equal(a[k], b[k]) for a, b in zip(snapshots, snapshots[1:]) for k in a)
        assert changed, f"{method}: masks never moved"


def test_lottery_ticket_rewinding(tmp_path):
    L.seed_everything(0)
    pruning = Pruning(amount=0.5, schedule="steps", schedule_steps=[6], schedule_amounts=[0.5], rewind_step=2,
                      export_sparse=None)
    seen = {}

    class Capture(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                seen["w2"] = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}

    class AfterRewind(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 6:
                seen["w6"] = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}

    _trainer(tmp_path, [Capture(), pruning, AfterRewind()], enable_checkpointing=False, max_epochs=1).fit(TinyTask(), _loader())
    for k, w2 in seen["w2"].items():
        expected = w2 * pruning.masks[k] if k in pruning.masks else w2
        assert torch.equal(seen["w6"][k], expected), k
