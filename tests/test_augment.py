"""Vision augmentation and label mixing (issue 17): transforms per split, determinism, Mixup/CutMix targets."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import needs_fmnist
from omegaconf import OmegaConf

from lightning_eff.cli import compose
from lightning_eff.data import FashionMNISTDataModule
from lightning_eff.data.common import BatchGatherDataset, take_fraction
from lightning_eff.errors import ConfigError
from lightning_eff.learning.augment import vision as V
from lightning_eff.tasks import ClassificationTask

ALL_OPS = [V.flip(), V.crop(4), V.rotate(), V.shear(), V.translate(), V.scale(), V.resized_crop(),
           V.rand_augment(), V.rand_augment(m=10, increasing=True), V.auto_augment(), V.auto_augment("original"),
           V.trivial_augment()]


def _batch(channels: int, size: int, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("channels,size", [(1, 28), (1, 32), (3, 32), (3, 224)])
def test_every_op_runs_on_grey_and_rgb_images_of_any_size(channels, size):
    x = _batch(channels, size, n=2 if size == 224 else 6)
    for op in ALL_OPS:
        out = V.ImageAugment(ops=[op]).images(x)
        assert out.shape == x.shape and out.dtype == torch.uint8, op
    erased = V.ImageAugment(erasing=V.random_erasing(p=1.0)).normalized(x.float())
    assert erased.shape == x.shape and not torch.equal(erased, x.float())


def test_ops_change_images_and_are_reproducible_under_a_seed():
    x = _batch(1, 28)
    aug = V.ImageAugment(ops=[V.rand_augment(n=2, m=9), V.rotate(30)])

    def run(seed):
        L.seed_everything(seed, verbose=False)  # python, numpy (timm's op choice) and torch
        return aug.images(x)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)


def test_flip_at_p1_is_the_mirror_image():
    x = _batch(1, 28)
    assert torch.equal(V.ImageAugment(ops=[V.flip(p=1.0)]).images(x), x.flip(-1))


def test_timm_posterize_at_0_bits_is_made_valid():
    """timm maps low magnitudes to 0 bits, which Pillow >= 11 refuses; our build keeps 1 bit."""
    from PIL import Image

    V._timm_auto_augment()
    from timm.data import auto_augment as aa

    img = Image.new("L", (8, 8), 200)
    assert aa.NAME_TO_OP["Posterize"](img, 0).getpixel((0, 0)) == 128


def test_bad_options_name_the_option():
    with pytest.raises(ConfigError, match="rand_augment.m"):
        V.rand_augment(m=11)
    with pytest.raises(ConfigError, match="auto_augment.policy"):
        V.auto_augment("imagenet2")
    with pytest.raises(ConfigError, match=r"ops\[0\]"):
        V.ImageAugment(ops=[3])
    with pytest.raises(ConfigError, match="task.mixup.alpha"):
        V.make_mixup({"alpha": 0.2}, 10)
    with pytest.raises(ConfigError, match="both 0"):
        V.make_mixup({"mixup_alpha": 0.0}, 10)


def test_an_op_that_changes_the_size_is_refused():
    from torchvision.transforms import v2

    with pytest.raises(ConfigError, match="changed the image shape"):
        V.ImageAugment(ops=[v2.Resize(16)]).images(_batch(1, 28))


@needs_fmnist
def test_val_and_test_are_never_augmented_train_is():
    kw = dict(limit_train=64, limit_val=32, limit_test=32, batch_size=32)
    plain = FashionMNISTDataModule(**kw)
    aug = FashionMNISTDataModule(**kw, train_transform=V.ImageAugment(ops=ALL_OPS[:3], erasing=V.random_erasing(p=1.0)))
    for dm in (plain, aug):
        dm.setup()
    for name in ("val_dataloader", "test_dataloader"):
        a, b = next(iter(getattr(plain, name)())), next(iter(getattr(aug, name)()))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(plain.sample_inputs(4), aug.sample_inputs(4))
    torch.manual_seed(0)
    a = next(iter(plain.train_dataloader()))
    torch.manual_seed(0)
    b = next(iter(aug.train_dataloader()))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[0], b[0])  # same images and labels, transformed
    assert aug.unlabeled_set().train_transform is None


@needs_fmnist
@pytest.mark.parametrize("workers", [0, 2])
def test_augmented_batches_are_deterministic_under_seed_everything(workers):
    def batches(seed):
        L.seed_everything(seed, workers=True, verbose=False)
        dm = FashionMNISTDataModule(limit_train=96, limit_val=8, limit_test=8, batch_size=32, num_workers=workers,
                                    train_transform={"_target_": "lightning_eff.learning.augment.vision.ImageAugment",
                                                     "ops": [{"_target_": "lightning_eff.learning.augment.vision.rand_augment"}]})
        dm.setup()
        loader = dm.train_dataloader()
        if workers:  # Lightning's worker seeding, as the Trainer installs it
            from lightning.fabric.utilities.seed import pl_worker_init_function

            loader.worker_init_fn = pl_worker_init_function
        return [b[0] for b in loader]

    a, b, c = batches(3), batches(3), batches(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_train_transform_accepts_a_list_a_node_or_one_op():
    from lightning_eff.learning.augment.vision import check_image_transform

    assert len(check_image_transform("t", [V.flip(), V.rotate()]).ops) == 2
    node = {"_target_": "lightning_eff.learning.augment.vision.flip", "p": 1.0}
    assert len(check_image_transform("t", node).ops) == 1
    with pytest.raises(ConfigError, match="data.train_transform"):
        check_image_transform("data.train_transform", {"ops": []})


def test_every_train_transform_preset_composes_and_builds():
    from pathlib import Path

    from lightning_eff.cli import CONF_DIR
    from lightning_eff.learning.augment.vision import check_image_transform

    names = sorted(p.stem for p in (Path(CONF_DIR) / "data" / "train_transform").glob("*.yaml"))
    assert {"rand_augment", "auto_augment", "trivial_augment", "random_erasing", "standard"} <= set(names)
    x = _batch(1, 32)
    from lightning_eff.learning.augment.text import check_text_transform

    text = [n for n in names if "augment.text" in (Path(CONF_DIR) / "data" / "train_transform" / f"{n}.yaml").read_text()]
    assert set(text) == {"eda", "switchout"}
    for name in names:
        recipe = "pqrnn" if name in text else "mobilenet_baseline"
        node = OmegaConf.to_container(compose(recipe, [f"+data/train_transform={name}"]).data.train_transform)
        if name in text:
            assert len(check_text_transform("data.train_transform", node)(["a few words of text here"])) == 1
            continue
        aug = check_image_transform("data.train_transform", node)
        assert aug.normalized(aug.images(x).float()).shape == x.shape, name
    for name in ("mixup", "cutmix", "mixup_cutmix"):
        cfg = compose("mobilenet_baseline", [f"+task/mixup={name}"])
        assert V.make_mixup(OmegaConf.to_container(cfg.task.mixup), 10) is not None


# --- label mixing ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
@pytest.mark.parametrize("n", [8, 7, 1])
def test_mixed_targets_sum_to_one_and_match_the_mixing_ratio(kind, n):
    torch.manual_seed(0)
    mix = V.make_mixup({"mixup_alpha": 0.4} if kind == "mixup" else {"cutmix_alpha": 1.0}, num_classes=10)
    x = torch.randn(n, 1, 16, 16)
    y = torch.arange(n) % 10
    xm, soft = V.mix_batch(mix, x, y)
    assert soft.shape == (n, 10) and torch.allclose(soft.sum(1), torch.ones(n))
    even = n - n % 2
    if even:
        lam = soft[0, y[0]].item()  # timm 'batch' mode: one lambda per batch, partner = the flipped batch
        partner = x[:even].flip(0)
        if kind == "mixup":
            assert torch.allclose(xm[:even], lam * x[:even] + (1 - lam) * partner, atol=1e-5)
        else:  # the share of pixels taken from the partner is 1 - lambda (timm corrects lambda to the box)
            from_partner = ((xm[:even] - x[:even]).abs() > 0).float().mean().item()
            assert abs(from_partner - (1 - lam)) < 0.05
        assert torch.allclose(soft[0, y[even - 1]], torch.tensor(1 - lam), atol=1e-6) or y[0] == y[even - 1]
    if n % 2:  # the odd one out stays unmixed with its one-hot target
        assert torch.equal(xm[-1], x[-1]) and soft[-1, y[-1]] == 1.0


def test_soft_cross_entropy_matches_timm_and_hard_ce():
    from timm.loss import SoftTargetCrossEntropy

    logits, target = torch.randn(5, 10), torch.softmax(torch.randn(5, 10), 1)
    assert torch.allclose(V.soft_cross_entropy(logits, target), SoftTargetCrossEntropy()(logits, target), atol=1e-6)
    y = torch.tensor([1, 2, 3, 4, 5])
    hard = torch.nn.functional.one_hot(y, 10).float()
    assert torch.allclose(V.soft_cross_entropy(logits, hard), torch.nn.functional.cross_entropy(logits, y), atol=1e-6)


def test_the_task_trains_on_mixed_batches_and_refuses_text():
    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1},
                              mixup={"mixup_alpha": 0.2, "cutmix_alpha": 1.0}, label_smoothing=0.1)
    assert task.mixup.label_smoothing == 0.1
    x, y = torch.randn(6, 1, 16, 16), torch.arange(6)
    calls = []
    task.log = lambda *a, **k: calls.append(a[0])
    loss = task.training_step((x, y), 0)
    assert loss.requires_grad and loss > 0
    with pytest.raises(ConfigError, match="task.mixup"):
        task.training_step({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}, 0)


def test_distillation_sees_the_mixed_inputs_the_student_saw():
    """The teacher runs on the student's (mixed) inputs: a teacher identical to the student agrees exactly."""
    import copy

    from lightning_eff.callbacks import Distillation

    L.seed_everything(0, verbose=False)
    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}, mixup={"mixup_alpha": 1.0})
    teacher = copy.deepcopy(task.model).eval()
    task.model.eval()  # the same function as the teacher (BN in eval, no dropout)
    for m in task.model.modules():
        m.train = lambda mode=True, _m=m: _m  # keep eval through the fit
    seen = {}
    kd = Distillation(teacher=teacher, kd_weight=1.0, task_weight=0.0, temperature=1.0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 1, 16, 16), torch.arange(16) % 10)

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["loss"] = float(outputs["loss"] if isinstance(outputs, dict) else outputs)

    trainer = L.Trainer(max_steps=1, callbacks=[kd, Probe()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, torch.utils.data.DataLoader(data, batch_size=8))
    assert abs(seen["loss"]) < 1e-5  # KL(teacher || student) = 0 only when both saw the same mixed images


def test_label_fraction_keeps_that_share_of_every_class():
    idx = torch.arange(1000).numpy()
    labels = (idx % 10)
    kept = take_fraction(idx, labels, 0.05, seed=0)
    assert len(kept) == 50 and all((labels[kept] == c).sum() == 5 for c in range(10))
    assert (take_fraction(idx, labels, 0.05, seed=0) == kept).all()
    assert not (take_fraction(idx, labels, 0.05, seed=1) == kept).all()
    with pytest.raises(ConfigError, match="label_fraction"):
        FashionMNISTDataModule(label_fraction=1.5)
    with pytest.raises(ConfigError, match="give one"):
        FashionMNISTDataModule(label_fraction=0.1, limit_train=100)


@needs_fmnist
def test_label_fraction_on_fashion_mnist_is_class_balanced_and_the_rest_is_the_pool():
    dm = FashionMNISTDataModule(label_fraction=0.01, limit_val=16, limit_test=16)
    dm.setup()
    assert torch.bincount(dm.train_set.labels).tolist() == [55] * 10
    assert len(dm.unlabeled_set()) == 55000 - 550


def test_batch_gather_dataset_applies_the_transform_to_train_batches_only():
    imgs, labels = _batch(1, 16, n=8), torch.arange(8)
    aug = V.ImageAugment(ops=[V.flip(p=1.0)])
    ds = BatchGatherDataset(imgs, labels, channels=1, transform=aug)
    x, y = ds.collate(list(range(8)))
    assert torch.equal(x, imgs.flip(-1).float() / 255) and torch.equal(y, labels)
    assert torch.equal(ds.transform(imgs, augment=False), imgs.float() / 255)


def test_offline_distillation_refuses_mixing(tmp_path):
    from lightning_eff.callbacks import Distillation

    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}, mixup={"cutmix_alpha": 1.0})
    teacher = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}).model
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 16, 16), torch.arange(8))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Distillation(teacher=teacher, cache=str(tmp_path / "c.pt"))])
    with pytest.raises(ConfigError, match="task.mixup"):
        trainer.fit(task, torch.utils.data.DataLoader(data, batch_size=4))


@needs_fmnist
def test_offline_distillation_on_augmented_data_warns_and_still_uses_indexed_batches(tmp_path):
    from lightning_eff.callbacks import Distillation

    dm = FashionMNISTDataModule(limit_train=32, limit_val=16, limit_test=16, batch_size=16, resize=16,
                                train_transform=[V.flip()])
    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1})
    teacher = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}).model
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Distillation(teacher=teacher, cache=str(tmp_path / "c.pt"))])
    with pytest.warns(UserWarning, match="train_transform"):
        trainer.fit(task, datamodule=dm)
    assert dm.return_index is True and (tmp_path / "c.pt").is_file()
