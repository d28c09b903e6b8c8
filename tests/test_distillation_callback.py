"""The Distillation callback on real (tiny) Lightning fits: an unmodified user module, a frozen teacher,
exact loss, offline cache, intermediate layers, resume, and the bad inputs of RELIABILITY.md."""
from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import needs_fmnist, needs_wordnet
from torch import nn
from user_module import quiet_trainer, same_as_train

from lightning_eff import ClassificationTask, ConfigError, Distillation
from lightning_eff.learning.distillation import kd_loss
from lightning_eff.models import create_model

#: Fixed tensors, no shuffling (two fits see identical batches); optional index-carrying batches.
Data = same_as_train


class UserModule(L.LightningModule):
    """A user's own module: nothing distillation-aware; its optimizer only sees self.net."""

    def __init__(self, seed=0, lr=0.5):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=self.lr)


def _teacher(seed=1, **kw):
    torch.manual_seed(seed)
    return create_model("mobilenetv2_tiny", num_classes=10, in_chans=1, **kw).eval()


def _trainer(tmp_path, callbacks, **kw):
    return quiet_trainer(tmp_path, callbacks, **{**dict(max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0), **kw})


def test_one_step_equals_hand_computed_equation_5(tmp_path):
    """λ1·CE + λ2·T²·KL through an unmodified user module: one SGD step equals the manual update."""
    teacher = _teacher()
    user, ref = UserModule(lr=0.5), UserModule(lr=0.5)
    dm = Data()
    x, y = dm.x[:8], dm.y[:8]
    cb = Distillation(teacher=teacher, temperature=3.0, task_weight=0.3, kd_weight=0.7, module_attr="net")
    _trainer(tmp_path, [cb], max_steps=1).fit(user, datamodule=dm)
    with torch.no_grad():
        t_logits = teacher(x)
    s_logits = ref.net(x)
    loss = 0.3 * F.cross_entropy(s_logits, y) + 0.7 * kd_loss(s_logits, t_logits, 3.0)
    loss.backward()
    with torch.no_grad():
        for p_ref, p in zip(ref.net.parameters(), user.net.parameters()):
            assert torch.allclose(p_ref - 0.5 * p_ref.grad, p, atol=1e-6)
    assert "training_step" not in user.__dict__  # unwrapped after fit


def test_teacher_frozen_invariant_not_in_optimizer_or_checkpoint(tmp_path):
    teacher = _teacher()
    before = copy.deepcopy(teacher.state_dict())
    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}, lr=0.1, scheduler="constant")
    cb = Distillation(teacher=teacher)
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(task, datamodule=Data())
    trainer.validate(task, datamodule=Data())
    trainer2 = _trainer(tmp_path, [cb])
    trainer2.fit(task, datamodule=Data())
    assert teacher.training is False and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not any(id(p) in teacher_ids for g in trainer2.optimizers[0].param_groups for p in g["params"])
    assert all(p.device.type == "cpu" for p in teacher.parameters())
    path = tmp_path / "student.ckpt"
    trainer2.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])
    assert len(ckpt["state_dict"]) == len(task.state_dict())
    assert all(not v for k, v in ckpt["callbacks"].items() if "Distillation" in k)
    metrics = trainer2.callback_metrics
    assert {"distill/kd_loss_epoch", "distill/task_loss_epoch", "distill/agreement_epoch"} <= set(metrics)


def test_save_teacher_puts_it_in_the_checkpoint(tmp_path):
    teacher = _teacher()
    cb = Distillation(teacher=teacher, save_teacher=True, module_attr="net")
    trainer = _trainer(tmp_path, [cb], max_steps=1)
    trainer.fit(UserModule(), datamodule=Data())
    trainer.save_checkpoint(tmp_path / "s.ckpt")
    state = torch.load(tmp_path / "s.ckpt", weights_only=True)["callbacks"]
    (entry,) = [v for k, v in state.items() if "Distillation" in k]
    assert set(entry["teacher"]) == set(teacher.state_dict())


def test_cached_logits_equal_online_training(tmp_path):
    teacher = _teacher()
    results = []
    for cache in (None, str(tmp_path / "logits.pt")):
        user = UserModule()
        cb = Distillation(teacher=teacher, cache=cache, module_attr="net", kd_weight=0.8, task_weight=0.2)
        _trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=None).fit(user, datamodule=Data(indexed=cache is not None))
        results.append(torch.cat([p.detach().flatten() for p in user.net.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)
    # a later run trains from the cache alone, without any teacher
    user = UserModule()
    _trainer(tmp_path, [Distillation(cache=str(tmp_path / "logits.pt"), module_attr="net", kd_weight=0.8, task_weight=0.2)],
             max_epochs=2, limit_train_batches=None).fit(user, datamodule=Data(indexed=True))
    assert torch.allclose(torch.cat([p.detach().flatten() for p in user.net.parameters()]), results[0], atol=1e-6)


def test_cache_for_other_data_is_refused(tmp_path):
    teacher = _teacher()
    path = str(tmp_path / "logits.pt")
    _trainer(tmp_path, [Distillation(teacher=teacher, cache=path, module_attr="net")], max_steps=1).fit(
        UserModule(), datamodule=Data(indexed=True))
    from lightning_eff.learning.distillation import TeacherLogitCache

    with pytest.raises(ConfigError, match="holds 48 examples but the training set has 40"):
        TeacherLogitCache(path).load(num_examples=40)


@needs_fmnist
def test_cache_with_our_datamodule_switches_to_indexed_batches(tmp_path):
    from lightning_eff.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(limit_train=64, limit_val=32, limit_test=32, batch_size=32, resize=16)
    cb = Distillation(teacher=_teacher(), cache=str(tmp_path / "fm.pt"), module_attr="net")
    _trainer(tmp_path, [cb], max_steps=2).fit(UserModule(), datamodule=dm)
    assert dm.return_index is True
    assert cb.cache.logits.shape == (64, 10)


def test_intermediate_layers_projection_trained_and_resume_is_exact(tmp_path):
    torch.manual_seed(3)
    teacher = create_model("mobilenetv2", width=0.5, num_classes=10, in_chans=1, small_input_stages=2).eval()

    def make():
        torch.manual_seed(0)
        task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}, lr=0.05, scheduler="constant")
        cb = Distillation(teacher=teacher, layers={"blocks.3": "blocks.3", "blocks.2": {"teacher": "blocks.2",
                          "loss": "attention_transfer", "weight": 10.0}}, feature_loss="mse", module_attr="model")
        return task, cb

    task, cb = make()
    full = _trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=3)
    full.fit(task, datamodule=Data())
    assert isinstance(task.distill_projections["blocks__3"], nn.Conv2d)  # 16 -> 32 channels
    assert "distill/feature_loss_epoch" in full.callback_metrics
    w_full = copy.deepcopy(task.state_dict())

    task1, cb1 = make()
    first = _trainer(tmp_path, [cb1], max_epochs=1, limit_train_batches=3)
    first.fit(task1, datamodule=Data())
    first.save_checkpoint(tmp_path / "mid.ckpt")
    task2, cb2 = make()
    _trainer(tmp_path, [cb2], max_epochs=2, limit_train_batches=3).fit(task2, datamodule=Data(), ckpt_path=str(tmp_path / "mid.ckpt"))
    for k, v in task2.state_dict().items():
        assert torch.allclose(v.float(), w_full[k].float(), atol=1e-6), k


def test_projection_added_to_a_user_optimizer_that_missed_it(tmp_path):
    torch.manual_seed(3)
    teacher = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 10))
    user = UserModule()
    cb = Distillation(teacher=teacher, layers={"0": "0"}, module_attr="net")
    trainer = _trainer(tmp_path, [cb], max_steps=2)
    before = user.distill_projections["0"].weight.detach().clone() if hasattr(user, "distill_projections") else None
    trainer.fit(user, datamodule=Data())
    proj = user.distill_projections["0"]
    assert before is None and proj.weight.shape == (12, 4, 1, 1)
    assert any(p is proj.weight for g in trainer.optimizers[0].param_groups for p in g["params"])


def test_teacher_from_checkpoint_and_registry_spec(tmp_path):
    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}, lr=0.1, scheduler="constant")
    trainer = _trainer(tmp_path, [], max_steps=1)
    trainer.fit(task, datamodule=Data())
    path = str(tmp_path / "teacher.ckpt")
    trainer.save_checkpoint(path)
    x = Data().x[:4]
    for spec in (path, {"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1, "checkpoint": path}):
        cb = Distillation(teacher=spec, module_attr="net")
        _trainer(tmp_path, [cb], max_steps=1).fit(UserModule(), datamodule=Data())
        with torch.no_grad():
            assert torch.allclose(cb.teacher(x), task.model.eval()(x), atol=1e-5)


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="temperature"):
        Distillation(teacher=_teacher(), temperature=0.0)
    with pytest.raises(ConfigError, match="kd_weight"):
        Distillation(teacher=_teacher(), kd_weight=1.5)
    with pytest.raises(ConfigError, match="feature_loss"):
        Distillation(teacher=_teacher(), feature_loss="l3")
    with pytest.raises(ConfigError, match="needs a teacher"):
        Distillation()
    user = UserModule()
    with pytest.raises(ConfigError, match="teacher is the student"):
        _trainer(tmp_path, [Distillation(teacher=user, module_attr="net")], max_steps=1).fit(user, datamodule=Data())
    user = UserModule()
    with pytest.raises(ConfigError, match="shares .* parameter"):
        _trainer(tmp_path, [Distillation(teacher=user.net, module_attr="net")], max_steps=1).fit(user, datamodule=Data())
    five = nn.Sequential(nn.Flatten(), nn.Linear(256, 5))
    with pytest.raises(ConfigError, match=r"class-count mismatch.*\(8, 10\).*\(8, 5\)"):
        _trainer(tmp_path, [Distillation(teacher=five, module_attr="net")], max_steps=1).fit(UserModule(), datamodule=Data())
    half = Distillation(teacher=_teacher(), module_attr="net", teacher_inputs=lambda a, k: ((a[0][:4],), k))
    with pytest.raises(ConfigError, match=r"batch-size mismatch.*\(8, 10\).*\(4, 10\)"):
        _trainer(tmp_path, [half], max_steps=1).fit(UserModule(), datamodule=Data())
    with pytest.raises(ConfigError, match="blocks.99.*not found"):
        _trainer(tmp_path, [Distillation(teacher=_teacher(), layers={"0": "blocks.99"}, module_attr="net")],
                 max_steps=1).fit(UserModule(), datamodule=Data())
    with pytest.raises(ConfigError, match=r"module_attr='missing'.*does not exist"):  # refused at setup now
        _trainer(tmp_path, [Distillation(teacher=_teacher(), module_attr="missing")], max_steps=1).fit(
            _Indirect(), datamodule=Data())
    with pytest.raises(ConfigError, match="was not called"):
        _trainer(tmp_path, [Distillation(teacher=_teacher(), module_attr="net")], max_steps=1).fit(
            _Indirect(), datamodule=Data())


class _Indirect(UserModule):
    """training_step calls a function of the net's layers, never the module the callback hooked."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = x
        for layer in self.net:
            h = layer(h)
        return F.cross_entropy(h, y)


@needs_fmnist
def test_pseudo_labels_extend_the_training_set_with_confident_teacher_labels(tmp_path):
    from lightning_eff.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(limit_train=64, limit_val=32, limit_test=32, batch_size=32, resize=16, val_size=59000)
    dm.setup("fit")
    pool = dm.unlabeled_set()
    assert len(pool) == 1000 - 64 and bool((pool.labels == -1).all())  # 60k - 59k held out, minus the 64 kept
    teacher = _teacher()
    cb = Distillation(teacher=teacher, module_attr="net", pseudo_labels=0.0)
    _trainer(tmp_path, [cb], max_steps=1).fit(UserModule(), datamodule=dm)
    assert cb.pseudo_label_stats == {"pool": 936, "kept": 936, "train_examples": 1000}
    with torch.no_grad():
        expected = teacher(pool.transform(pool.images[:8], augment=False)).argmax(-1)
    assert torch.equal(dm.train_set.labels[64:72], expected)
    strict = FashionMNISTDataModule(limit_train=64, limit_val=32, limit_test=32, batch_size=32, resize=16, val_size=59000)
    cb2 = Distillation(teacher=teacher, module_attr="net", pseudo_labels=0.99)
    _trainer(tmp_path, [cb2], max_steps=1).fit(UserModule(), datamodule=strict)
    assert cb2.pseudo_label_stats["kept"] < 936  # an untrained teacher is rarely 99% sure
    with pytest.raises(ConfigError, match="no unlabeled pool"):
        FashionMNISTDataModule(val_size=59000, limit_val=8, limit_test=8).unlabeled_set()
    with pytest.raises(ConfigError, match="pseudo_labels"):
        Distillation(teacher=teacher, pseudo_labels=1.0)


@needs_wordnet
def test_text_pool_and_pseudo_labels():
    from lightning_eff.data import WordNetSupersenseDataModule

    dm = WordNetSupersenseDataModule(tokenizer="raw", limit_train=200, limit_val=16, limit_test=16)
    dm.setup("fit")
    pool = dm.unlabeled_set()
    assert len(pool) == 65691 - 200
    assert dm.add_pseudo_labels(torch.tensor([0, 5]), torch.tensor([3, 4])) == 202
    assert dm.texts("train")[-2:] == [pool.texts[0], pool.texts[5]] and dm.labels("train")[-2:] == [3, 4]
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["text"]) == len(batch["labels"])


def test_stale_cache_is_rebuilt_with_a_teacher_and_refused_without(tmp_path):
    path = str(tmp_path / "logits.pt")
    first, second = _teacher(1), _teacher(2)
    _trainer(tmp_path, [Distillation(teacher=first, cache=path, module_attr="net")], max_steps=1).fit(
        UserModule(), datamodule=Data(indexed=True))
    cb = Distillation(teacher=second, cache=path, module_attr="net")
    _trainer(tmp_path, [cb], max_steps=1).fit(UserModule(), datamodule=Data(indexed=True))
    with torch.no_grad():
        assert torch.allclose(cb.cache.logits[:8], second(Data().x[:8]), atol=1e-5)  # rebuilt by the new teacher
    with pytest.raises(ConfigError, match="holds 48 examples but the training set has 40"):
        _trainer(tmp_path, [Distillation(cache=path, module_attr="net")], max_steps=1).fit(
            UserModule(), datamodule=Data(n=40, indexed=True))
    with pytest.raises(ConfigError, match="needs batches with example indices"):
        _trainer(tmp_path, [Distillation(teacher=first, cache=str(tmp_path / "x.pt"), module_attr="net")],
                 max_steps=1).fit(UserModule(), datamodule=Data(indexed=False))


@needs_wordnet
def test_a_slice_tokenizes_like_the_full_training_split():
    """A teacher trained on all the data and a student on a slice must share one WordPiece vocabulary."""
    from lightning_eff.data import WordNetSupersenseDataModule

    full = WordNetSupersenseDataModule(tokenizer="wordpiece", vocab_size=4000, limit_val=8, limit_test=8)
    part = WordNetSupersenseDataModule(tokenizer="wordpiece", vocab_size=4000, limit_train=300, limit_val=8, limit_test=8)
    full.setup()
    part.setup()
    assert full.tokenizer.get_vocab() == part.tokenizer.get_vocab()
