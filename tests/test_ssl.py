"""Self-supervised pretraining (issue 17): NT-Xent vs a hand-written reference, views, rotation, kNN probe,
the SimCLR / rotation tasks, and the backbone hand-over to fine-tuning (keys checked, mismatches named)."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_OVERRIDES, needs_fmnist
from torch import nn

from lightning_eff.callbacks import KNNMonitor
from lightning_eff.cli import compose, run
from lightning_eff.errors import ConfigError
from lightning_eff.learning.ssl.contrastive import (
    SimCLRViews,
    embed,
    knn_predict,
    nt_xent,
    rotate_batch,
)
from lightning_eff.models import create_model
from lightning_eff.models.backbone import head_prefixes, load_backbone
from lightning_eff.tasks import ClassificationTask, RotationTask, SimCLRTask

TINY = {"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}


def nt_xent_reference(z1, z2, t):
    """SimCLR's loss written out per anchor: -log(exp(s_i,pos / t) / sum_{k != i} exp(s_i,k / t))."""
    z = torch.cat([z1, z2]).double()
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        sims = [float(F.cosine_similarity(z[i], z[k], dim=0)) / t for k in range(n)]
        denom = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[pos]) / denom)
    return total / n


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_the_hand_written_reference(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert abs(float(nt_xent(z1, z2, t)) - nt_xent_reference(z1, z2, t)) < 1e-5
    # identical views: the loss is lower than for random pairs, and symmetric in the two views
    assert nt_xent(z1, z1 + 1e-3, t) < nt_xent(z1, z2, t)
    assert torch.allclose(nt_xent(z1, z2, t), nt_xent(z2, z1, t), atol=1e-6)
    with pytest.raises(ConfigError, match="same shape"):
        nt_xent(z1, z2[:3], t)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 224)])
def test_views_keep_shape_differ_and_follow_the_seed(channels, size):
    x = torch.randn(4, channels, size, size)
    views = SimCLRViews(blur=0.5)
    torch.manual_seed(0)
    a = views(x)
    torch.manual_seed(0)
    b = views(x)
    c = views(x)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # the flip alone (full crop area, aspect ratio drawn near 1) mirrors the image: compare with flip=0
    torch.manual_seed(5)
    flipped = SimCLRViews(crop_scale=(1.0, 1.0), flip=1.0, jitter=0.0, grayscale=0.0)(x)
    torch.manual_seed(5)
    kept = SimCLRViews(crop_scale=(1.0, 1.0), flip=0.0, jitter=0.0, grayscale=0.0)(x)
    assert torch.allclose(flipped, kept.flip(-1), atol=1e-4)
    with pytest.raises(ConfigError, match="views.crop_scale"):
        SimCLRViews(crop_scale=(0.5, 1.5))


def test_rotation_batch_is_the_four_rotations_with_labels():
    x = torch.arange(2 * 9, dtype=torch.float).view(2, 1, 3, 3)
    r, y = rotate_batch(x)
    assert r.shape == (8, 1, 3, 3) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(r[2], torch.rot90(x[0], 1, dims=(1, 2))) and torch.equal(r[6], x[0].flip(1).flip(2).rot90(1, dims=(1, 2)))
    with pytest.raises(ConfigError, match="square"):
        rotate_batch(torch.zeros(1, 1, 3, 4))


def test_knn_predict_matches_a_brute_force_vote():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(50, 4, generator=g), torch.randint(0, 3, (50,), generator=g)
    query = torch.randn(7, 4, generator=g)
    pred = knn_predict(query, bank, labels, num_classes=3, k=5, temperature=0.1)
    for i in range(7):
        sims = F.cosine_similarity(query[i : i + 1], bank)
        top = sims.topk(5).indices
        votes = torch.zeros(3).index_add_(0, labels[top], (sims[top] / 0.1).exp())
        assert pred[i] == votes.argmax()
    assert (knn_predict(bank, bank, labels, 3, k=1) == labels).all()  # a point is its own nearest neighbour


def test_embed_is_the_penultimate_features_for_timm_and_any_model():
    net = create_model("mobilenetv2_tiny", num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    feats = embed(net, x)
    assert torch.allclose(net.get_classifier()(feats), net(x), atol=1e-5)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.out = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU()), nn.Linear(5, 3)

        def forward(self, x):
            return self.out(self.body(x))

    p = Plain()
    x = torch.randn(3, 1, 4, 4)
    assert torch.allclose(embed(p, x), p.body(x))
    with pytest.raises(ConfigError, match="no nn.Linear"):
        embed(nn.Conv2d(1, 1, 1), x)


def _fit(task, data, steps=6, callbacks=()):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks), num_sanity_val_steps=0,
                        limit_val_batches=2)
    trainer.fit(task, data)
    return trainer


class Blobs(L.LightningDataModule):
    """Images of 4 classes that differ in where a bright square sits: learnable features in a few steps."""

    def __init__(self, n=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 4
        self.x = 0.3 * torch.randn(n, 1, 16, 16, generator=g)
        for i, c in enumerate(self.y.tolist()):
            r, q = divmod(c, 2)
            self.x[i, 0, r * 8 : r * 8 + 8, q * 8 : q * 8 + 8] += 2.0

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=16, shuffle=True)

    val_dataloader = test_dataloader = train_dataloader


class FMNISTBatch(L.LightningDataModule):
    """32 real Fashion-MNIST images at 24 px as one fixed training batch (and the probe's val/test data)."""

    def __init__(self):
        super().__init__()
        from lightning_eff.data import FashionMNISTDataModule

        self.dm = FashionMNISTDataModule(limit_train=32, limit_val=32, limit_test=32, batch_size=32, resize=24)
        self.dm.setup()
        self.train_set = self.dm.train_set  # the KNNMonitor bank: in order, unaugmented

    def train_dataloader(self):
        return self.dm._loader(self.dm.train_set, 32, shuffle=False)

    def val_dataloader(self):
        return self.dm.val_dataloader()

    test_dataloader = val_dataloader


SMALL = {"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1, "small_input_stages": 1}


@pytest.mark.parametrize("name", ["mobilenetv2_tiny", "mobilenetv3", "plain_cnn"])
def test_pretraining_tasks_build_their_head_for_the_features_of_any_model(name):
    x = torch.randn(4, 1, 32, 32)
    for cls in (SimCLRTask, RotationTask):
        task = cls({"name": name, "num_classes": 10, "in_chans": 1})
        if cls is SimCLRTask:
            assert task._loss(x).ndim == 0
        else:
            assert task.rotation_head(task.embed(x)).shape == (4, 4)


@needs_fmnist
@pytest.mark.parametrize("cls", [SimCLRTask, RotationTask])
def test_pretraining_tasks_lower_their_loss_on_real_images_and_log_a_knn_probe(cls):
    """Fitting one fixed batch of real images lowers the loss on it: gradients reach the head and the backbone.

    SimCLR with mild views (crops of 80-100%, flips, no colour) and lr 0.05 for 30 steps: the loss on fresh views drops
    by 1.0-1.3 for seeds 0-3 on an AMX Xeon. The test's earlier setting (the default strong views, lr 0.3, 20 steps)
    passed on AVX2 but collapsed to the chance value log(63) on that Xeon: 4.150 -> 4.142 (and lr 0.1 with mild views
    collapsed for one seed of four), so its margin was the CPU's rounding, not the learning."""
    L.seed_everything(0, verbose=False)
    data = FMNISTBatch()
    if cls is SimCLRTask:
        task = cls(SMALL, lr=0.05, scheduler="constant", views={"crop_scale": [0.8, 1.0], "jitter": 0.0, "grayscale": 0.0})
    else:
        task = cls(SMALL, lr=0.02, scheduler="constant")
    x = data.dm.train_set.transform(data.dm.train_set.images, augment=False)

    def eval_loss():
        torch.manual_seed(1)
        with torch.no_grad():
            r, y = rotate_batch(x)
            loss = task._loss(x) if cls is SimCLRTask else F.cross_entropy(task.rotation_head(task.embed(r)), y)
        return float(loss)

    before = eval_loss()  # train-mode BatchNorm (batch statistics) before and after: the same function of x
    monitor = KNNMonitor(bank_size=32, query_size=32, k=5)
    trainer = _fit(task, data, steps=30 if cls is SimCLRTask else 20, callbacks=[monitor])
    task.train()
    after = eval_loss()
    assert after < before - 0.1, (before, after)
    loss_name = "ssl_loss" if cls is SimCLRTask else "rot_loss"
    assert f"train/{loss_name}" in trainer.callback_metrics and 0.0 <= monitor.last["val"] <= 1.0
    trainer.test(task, data, verbose=False)
    assert "test/knn_acc" in trainer.callback_metrics


def test_the_pretrained_checkpoint_loads_into_the_finetuning_model_with_matching_keys(tmp_path):
    L.seed_everything(0, verbose=False)
    task = SimCLRTask(TINY, lr=0.05)
    trainer = _fit(task, Blobs(), steps=2)
    path = tmp_path / "simclr.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    model_keys = {k[len("model."):] for k in state if k.startswith("model.")}
    fresh = create_model(TINY["name"], num_classes=10, in_chans=1)
    assert model_keys == set(fresh.state_dict())
    assert any(k.startswith("projector.") for k in state)  # the head lives outside the network

    # a fine-tuning model with another number of classes: the backbone is copied, the head stays fresh
    finetune = ClassificationTask({**TINY, "num_classes": 4, "backbone_ckpt": str(path)})
    for k, v in finetune.model.state_dict().items():
        if not k.startswith(tuple(head_prefixes(finetune.model))):
            assert torch.equal(v, state["model." + k]), k
    assert not torch.equal(finetune.model.get_classifier().weight, state["model.classifier.weight"][:4])


def test_a_mismatched_backbone_names_the_missing_and_unexpected_keys(tmp_path):
    other = create_model("mobilenetv2", width=0.5, num_classes=10, in_chans=1)  # another width: shapes differ
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(ConfigError, match="model.backbone_ckpt.*of another shape"):
        create_model("mobilenetv2_tiny", num_classes=10, in_chans=1, backbone_ckpt=str(path))
    net = create_model("mobilenetv2_tiny", num_classes=10, in_chans=1)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("blocks.0.")}
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError) as err:
        load_backbone(create_model("mobilenetv2_tiny", num_classes=10, in_chans=1), state)
    assert "missing ['blocks.0." in str(err.value) and "unexpected ['extra.weight']" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("mobilenetv2_tiny", backbone_ckpt=str(tmp_path / "nope.ckpt"))


@needs_fmnist
def test_simclr_stage_hands_its_backbone_to_the_finetuning_stage(tmp_path):
    cfg = compose("mobilenet_simclr", [*TINY_OVERRIDES, f"run_dir={tmp_path}", "++report.latency=false",
                                       "stages.simclr.data.limit_train=256", "data.label_fraction=null",
                                       "stages.simclr.trainer.max_epochs=2", "stages.simclr.trainer.limit_val_batches=1",
                                       "stages.simclr.callbacks.knn.bank_size=128", "stages.simclr.callbacks.knn.query_size=64",
                                       "stages.fit.trainer.max_steps=3", "stages.fit.trainer.val_check_interval=3"])
    out = run(cfg)
    assert out["stages"] == ["simclr", "fit"]
    ckpt = tmp_path / "simclr" / "simclr.ckpt"
    assert ckpt.is_file()
    assert 0.0 <= out["metrics"]["test/acc"] <= 1.0 and "val/acc" in out["metrics"]
    import csv

    rows = list(csv.DictReader(open(tmp_path / "simclr" / "metrics.csv")))
    assert any(r.get("val/knn_acc") for r in rows)  # the probe ran during pretraining
    # the same checkpoint also starts a separate fine-tuning run (the label-efficiency sweep's path)
    cfg = compose("mobilenet_finetune", [*TINY_OVERRIDES, f"run_dir={tmp_path / 'ft'}", "++report.latency=false",
                                         f"model.backbone_ckpt={ckpt}", "data.limit_train=null", "data.label_fraction=0.01",
                                         "trainer.max_steps=3", "trainer.val_check_interval=3"])
    assert run(cfg)["metrics"]["test/acc"] >= 0.0


def test_label_efficiency_table_and_plot_from_a_multirun_folder(tmp_path):
    import json

    from lightning_eff.label_efficiency import main as label_efficiency

    for i, (arm, fraction, acc) in enumerate([(None, 0.01, 0.70), ("x/simclr/simclr.ckpt", 0.01, 0.78),
                                              (None, 1.0, 0.90), ("x/simclr/simclr.ckpt", 1.0, 0.91), (None, 0.01, 0.72)]):
        run_dir = tmp_path / str(i)
        run_dir.mkdir()
        cfg = {"seed": i, "data": {"label_fraction": fraction}, "model": {"backbone_ckpt": arm}}
        (run_dir / "results.json").write_text(json.dumps({"config": cfg, "metrics": {"test/acc": acc}}))
    assert label_efficiency([str(tmp_path)]) == 0
    table = (tmp_path / "label_efficiency.md").read_text()
    assert "| 1% | 71.00% | 78.00% | +7.0 pt |" in table and "| 100% | 90.00% | 91.00% | +1.0 pt |" in table
    assert (tmp_path / "label_efficiency.png").read_bytes()[:4] == b"\x89PNG"


def test_label_efficiency_picks_each_arms_learning_rate_on_validation_not_test():
    from lightning_eff.label_efficiency import summarize

    rows = [{"arm": "simclr", "fraction": 0.01, "lr": 0.1, "val": 0.70, "acc": 0.90},   # best test, worse val
            {"arm": "simclr", "fraction": 0.01, "lr": 0.01, "val": 0.80, "acc": 0.78},
            {"arm": "scratch", "fraction": 0.01, "lr": 0.1, "val": 0.75, "acc": 0.74}]
    chosen = {}
    assert summarize(rows, chosen) == {0.01: {"scratch": 0.74, "simclr": 0.78}}
    assert chosen == {(0.01, "simclr"): 0.01, (0.01, "scratch"): 0.1}


@needs_fmnist
def test_the_knn_probe_is_reproducible_and_leaves_the_random_stream_alone():
    import random

    import numpy as np

    from lightning_eff.data import FashionMNISTDataModule
    from lightning_eff.learning.augment.vision import flip, rand_augment

    dm = FashionMNISTDataModule(limit_train=128, limit_val=64, limit_test=16, batch_size=32,
                                train_transform=[flip(), rand_augment()])
    dm.setup()

    class Holder:
        datamodule = dm

    task = SimCLRTask(TINY)
    monitor = KNNMonitor(bank_size=128, query_size=64, k=5)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    a = monitor.probe(Holder, task, "val")
    after = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = (torch.rand(1), random.random(), np.random.rand())
    assert after == expected  # probing drew nothing from the global generators
    assert monitor.probe(Holder, task, "val") == a  # the same bank (in order, unaugmented) every time


class _InOrder(L.LightningDataModule):
    """Blobs in a fixed order (no shuffling): a resumed fit sees the same batches as the uninterrupted one."""

    def __init__(self):
        super().__init__()
        self.data = Blobs()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.data.x, self.data.y), batch_size=16)


def _fit_epochs(task, epochs, ckpt_path=None, save=None):
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, _InOrder(), ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return task


def test_simclr_views_are_drawn_again_exactly_when_a_fit_resumes(tmp_path):
    def make():
        torch.manual_seed(0)
        return SimCLRTask(TINY, lr=0.05, scheduler="constant")

    full = _fit_epochs(make(), 2)
    _fit_epochs(make(), 1, save=tmp_path / "mid.ckpt")
    resumed = make()
    torch.manual_seed(123)  # another global stream in the resumed process: the views must not depend on it
    _fit_epochs(resumed, 2, ckpt_path=str(tmp_path / "mid.ckpt"))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.load(tmp_path / "mid.ckpt", weights_only=False)["lightning_eff_draw_seed"] == 0  # torch.manual_seed(0)
    # every step draws other views, every rank its own; the global stream is left where it was
    task = make()
    state = torch.get_rng_state()
    with task.step_rng(0):
        a = task.views(Blobs().x[:4])
    with task.step_rng(1):
        b = task.views(Blobs().x[:4])
    assert not torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    from lightning_eff.tasks.draws import step_seed

    assert len({step_seed(0, e, i, r) for e in range(3) for i in range(50) for r in range(4)}) == 600
