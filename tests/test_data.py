"""Datamodules: real-file slices of Fashion-MNIST / WordNet, and tiny files in the real formats
for the generic modules. Hand-written references: the IDX bytes, the wordnet line format, the
normalisation formula, and an exhaustive search over crops/flips for the augmentation."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FMNIST_DIR, WORDNET_DIR, needs_fmnist, needs_wordnet

from lightning_eff.data import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    TextFileDataModule,
    WordNetSupersenseDataModule,
    train_wordpiece_vocab,
)
from lightning_eff.data.common import random_crop_flip
from lightning_eff.data.fashion_mnist import read_idx
from lightning_eff.errors import ConfigError, DataNotFoundError

SMALL = dict(limit_train=256, limit_val=64, limit_test=64)


# ------------------------------------------------------------------ Fashion-MNIST (real files)
@needs_fmnist
def test_fmnist_batches_shapes_dtypes_labels():
    dm = FashionMNISTDataModule(batch_size=32, **SMALL)
    assert dm.num_classes == 10 and dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot"
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (256, 64, 64)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.cat([b[1] for b in dm.train_dataloader()])
    assert labels.min() >= 0 and labels.max() <= 9 and len(labels.unique()) == 10
    assert dm.input_shape == (1, 28, 28)


@needs_fmnist
def test_fmnist_normalisation_matches_raw_bytes():
    dm = FashionMNISTDataModule(normalize=True, **SMALL)
    raw = read_idx(f"{FMNIST_DIR}/train-images-idx3-ubyte.gz", 3)
    x = dm.sample_inputs(2)
    src = dm.split_indices["val"][:2]
    ref = (torch.from_numpy(raw[src].astype(np.float32))[:, None] / 255.0 - 0.2860) / 0.3530
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    plain = FashionMNISTDataModule(normalize=False, **SMALL).sample_inputs(2)
    torch.testing.assert_close(plain, ref * 0.3530 + 0.2860, atol=1e-5, rtol=0)


@needs_fmnist
def test_fmnist_full_split_sizes_deterministic_and_disjoint():
    a, b = FashionMNISTDataModule(seed=3), FashionMNISTDataModule(seed=3)
    c = FashionMNISTDataModule(seed=4, limit_test=10)
    for dm in (a, b, c):
        dm.setup()
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (55000, 5000, 10000)
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split_indices[k], b.split_indices[k])
    assert not np.array_equal(a.split_indices["val"], c.split_indices["val"])
    tr, va = set(a.split_indices["train"].tolist()), set(a.split_indices["val"].tolist())
    assert not (tr & va) and len(tr | va) == 60000
    assert len(c.test_set) == 10


@needs_fmnist
def test_fmnist_resize_channels_and_sample_inputs():
    dm = FashionMNISTDataModule(resize=32, channels=3, batch_size=16, **SMALL)
    assert dm.input_shape == (3, 32, 32)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 3, 32, 32)
    torch.testing.assert_close(x[:, 0], x[:, 2])  # grey replicated
    s = dm.sample_inputs(3)
    assert s.shape == (3, 3, 32, 32) and s.dtype == torch.float32
    assert dm.sample_inputs(100).shape[0] == 100  # cycles through the 64 val images


@needs_fmnist
def test_fmnist_augment_only_on_train():
    aug = FashionMNISTDataModule(augment=True, **SMALL)
    ref = FashionMNISTDataModule(augment=False, **SMALL)
    torch.manual_seed(0)
    va1 = torch.cat([b[0] for b in aug.val_dataloader()])
    va2 = torch.cat([b[0] for b in ref.val_dataloader()])
    torch.testing.assert_close(va1, va2)
    torch.testing.assert_close(torch.cat([b[0] for b in aug.test_dataloader()]), torch.cat([b[0] for b in ref.test_dataloader()]))
    idx = list(range(64))
    x_aug, _ = aug.train_set.collate(idx)
    x_ref, _ = ref.train_set.collate(idx)
    assert x_aug.shape == x_ref.shape and not torch.equal(x_aug, x_ref)


def test_random_crop_flip_is_a_padded_shift_or_flip():
    torch.manual_seed(1)
    x = torch.randint(1, 256, (24, 2, 7, 9), dtype=torch.uint8)
    pad = 3
    out = random_crop_flip(x, pad)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for i in range(len(x)):
        cands = [padded[i, :, dy : dy + 7, dx : dx + 9] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in cands)
    assert out.dtype == torch.uint8 and out.shape == x.shape


def _write_idx(path, arr: np.ndarray, magic: int):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def _tiny_fmnist(root, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 0x803)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 0x801)


def test_fmnist_from_custom_root_idx(tmp_path):
    _tiny_fmnist(tmp_path)
    dm = FashionMNISTDataModule(root=str(tmp_path), val_size=5, batch_size=4, normalize=False)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 10)
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 3)
    x, y = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(x[:, 0], torch.from_numpy(raw[:4].copy()).float() / 255)
    assert y.tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"data\.val_size=20 must be below the 20 training images"):
        FashionMNISTDataModule(root=str(tmp_path), val_size=20).setup()


def test_fmnist_corrupt_files(tmp_path):
    _tiny_fmnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataNotFoundError, match="corrupt"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(20), 0x803)  # wrong magic
    with pytest.raises(DataNotFoundError, match="magic"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as fh:  # header says 20, holds 3
        fh.write((0x801).to_bytes(4, "big") + (20).to_bytes(4, "big") + b"\x00\x01\x02")
    with pytest.raises(DataNotFoundError, match="implies"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()


def test_fmnist_missing_root_says_how_to_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        FashionMNISTDataModule(root=str(tmp_path / "nowhere")).setup()
    msg = str(info.value)
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in msg
    assert "data.root=/path" in msg and "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"val_size": -1}, "data.val_size"),
        ({"val_size": 60000}, "data.val_size"),
        ({"channels": 2}, "data.channels"),
        ({"resize": 2}, "data.resize"),
        ({"augment": "true"}, "data.augment"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"limit_train": 0}, "data.limit_train"),
        ({"seed": 1.5}, "data.seed"),
        ({"root": 3}, "data.root"),
    ],
)
def test_fmnist_bad_options(kwargs, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        FashionMNISTDataModule(**kwargs)


# ------------------------------------------------------------------ WordNet (real files)
def _count_synsets(pos):
    with open(f"{WORDNET_DIR}/data.{pos}", encoding="utf-8", errors="replace") as fh:
        return sum(1 for line in fh if not line.startswith("  "))


@needs_wordnet
def test_wordnet_classes_splits_and_raw_batches():
    dm = WordNetSupersenseDataModule(batch_size=8)
    assert dm.num_classes == 26 and dm.class_names[0] == "noun.Tops" and dm.class_names[-1] == "noun.time"
    assert WordNetSupersenseDataModule(pos=["noun", "verb"]).num_classes == 41
    verbs = WordNetSupersenseDataModule(pos=["verb"])
    assert verbs.num_classes == 15 and verbs.class_names[-1] == "verb.weather"
    dm.setup()
    n = _count_synsets("noun")
    sizes = {k: len(v) for k, v in dm.split_indices.items()}
    assert sum(sizes.values()) == n and sizes["val"] == sizes["test"] == round(0.1 * n)
    assert set(np.concatenate(list(dm.split_indices.values())).tolist()) == set(range(n))
    assert dm.tokenizer is None and dm.vocab_size is None
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"text", "labels"} and len(batch["text"]) == 8 and batch["labels"].dtype == torch.int64
    all_labels = dm.labels("train") + dm.labels("val") + dm.labels("test")
    assert min(all_labels) == 0 and max(all_labels) == 25 and len(set(all_labels)) == 26
    assert dm.sample_inputs(3) == {"text": dm.texts("val")[:3]}


@needs_wordnet
def test_wordnet_parsing_reference_line():
    # 00001740 03 n 01 entity 0 ... | that which is perceived or known or inferred ...
    dm = WordNetSupersenseDataModule(include_lemmas=True, pos=["noun"])
    pairs = [(t, y) for s in ("train", "val", "test") for t, y in zip(dm.texts(s), dm.labels(s))]
    hit = [p for p in pairs if p[0].startswith("entity: that which is perceived")]
    assert len(hit) == 1 and dm.class_names[hit[0][1]] == "noun.Tops"
    hit = [p for p in pairs if p[0].startswith("abstraction, abstract entity: a general concept")]
    assert len(hit) == 1 and dm.class_names[hit[0][1]] == "noun.Tops"


@needs_wordnet
def test_wordnet_split_determinism_and_limits():
    a = WordNetSupersenseDataModule(seed=1, limit_train=100, limit_val=20, limit_test=20)
    b = WordNetSupersenseDataModule(seed=1, limit_train=100, limit_val=20, limit_test=20)
    c = WordNetSupersenseDataModule(seed=2, limit_train=100, limit_val=20, limit_test=20)
    for dm in (a, b, c):
        dm.setup()
    for k in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split_indices[k], b.split_indices[k])
        assert a.texts(k) == b.texts(k)
    assert not np.array_equal(a.split_indices["train"], c.split_indices["train"])
    sets = [set(a.split_indices[k].tolist()) for k in ("train", "val", "test")]
    assert len(sets[0]) == 100 and not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


@needs_wordnet
def test_wordnet_wordpiece_batches_and_cache(tmp_path):
    kw = dict(tokenizer="wordpiece", vocab_size=400, max_length=16, batch_size=8, limit_train=300, limit_val=24,
              limit_test=8, cache_dir=str(tmp_path))
    dm = WordNetSupersenseDataModule(**kw)
    dm.setup()
    assert dm.vocab_size == 400 and dm.tokenizer is not None
    tok = dm.tokenizer
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[1] <= 16
    assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest in the batch only
    assert torch.equal(mask.bool(), ids != tok.pad_token_id)
    assert (ids[:, 0] == tok.cls_token_id).all()
    lengths = mask.sum(1)
    assert (ids[torch.arange(len(ids)), lengths - 1] == tok.sep_token_id).all()
    assert set(tok.convert_ids_to_tokens(list(range(5)))) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    s = dm.sample_inputs(2)
    assert set(s) == {"input_ids", "attention_mask"} and s["input_ids"].shape[0] == 2
    cached = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()
    again = WordNetSupersenseDataModule(**kw)
    again.setup()
    assert again.tokenizer.get_vocab() == tok.get_vocab()
    # a local HF tokenizer folder works as tokenizer=<path>
    local = WordNetSupersenseDataModule(**{**kw, "tokenizer": str(cached[0])})
    b2 = next(iter(local.val_dataloader()))
    torch.testing.assert_close(b2["input_ids"], ids)


def test_wordpiece_vocab_deterministic_across_processes():
    texts = [f"the quick brown fox number {i % 7} jumps over the lazy dog {i % 3}" for i in range(40)]
    texts += ["tokenization tokenizer tokens token", "unbelievable believe believer"]
    here = train_wordpiece_vocab(texts, 120)
    # load the module file alone (not the package) so the child skips importing lightning/torchvision
    path = os.path.join(os.path.dirname(__file__), "..", "lightning_eff", "data", "tokenizers.py")
    code = (
        "import json,sys,importlib.util as u; s=u.spec_from_file_location('tk', sys.argv[1]); m=u.module_from_spec(s);"
        "s.loader.exec_module(m); print(json.dumps(m.train_wordpiece_vocab(json.loads(sys.stdin.read()), 120)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, path], input=json.dumps(texts), capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here
    assert here[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(set(here)) == len(here)
    assert "token" in here and "##s" in here  # merged pieces and continuation pieces
    assert len(train_wordpiece_vocab(texts, 60)) == 60  # stops at vocab_size (alphabet here: 44)


@needs_wordnet
def test_wordnet_missing_root_says_how_to_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        WordNetSupersenseDataModule(root=str(tmp_path), pos=["noun", "verb"]).setup()
    msg = str(info.value)
    assert "apt-get update && apt-get install -y wordnet-base" in msg and "data.root=/path" in msg
    assert "data.noun" in msg and "data.verb" in msg


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"pos": ["adj"]}, r"data\.pos"),
        ({"pos": []}, r"data\.pos"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"data\.val_fraction"),
        ({"test_fraction": 1.0}, r"data\.test_fraction"),
        ({"tokenizer": "wordpeice"}, r"data\.tokenizer.*Did you mean 'wordpiece'"),
        ({"max_length": 1}, r"data\.max_length"),
        ({"vocab_size": 3}, r"data\.vocab_size"),
        ({"include_lemmas": 1}, r"data\.include_lemmas"),
        ({"eval_batch_size": 0}, r"data\.eval_batch_size"),
    ],
)
def test_wordnet_bad_options(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        WordNetSupersenseDataModule(**kwargs)


@needs_wordnet
def test_wordnet_hydra_config_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "conf", "data", "wordnet.yaml"))
    cfg.limit_train, cfg.limit_val, cfg.limit_test = 32, 8, 8
    dm = instantiate(cfg)
    assert dm.num_classes == 26 and len(dm.texts("train")) == 32


# ------------------------------------------------------------------ generic modules (tiny real-format files)
def _png_tree(root, classes=("ant", "bee", "cat"), per_class=6, size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_split_and_shapes(tmp_path):
    _png_tree(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, channels=3, val_fraction=0.2, test_fraction=0.2, batch_size=4)
    dm.setup()
    assert dm.class_names == ["ant", "bee", "cat"] and dm.num_classes == 3 and dm.input_shape == (3, 8, 8)
    assert sum(len(s) for s in (dm.train_set, dm.val_set, dm.test_set)) == 18 and len(dm.val_set) == 4
    idx = [set(dm.split_indices[k].tolist()) for k in ("train", "val", "test")]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    grey = ImageFolderDataModule(str(tmp_path), image_size=8, channels=1)
    assert grey.sample_inputs(2).shape == (2, 1, 8, 8)
    same = ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.2, test_fraction=0.2)
    same.setup()
    np.testing.assert_array_equal(same.split_indices["val"], dm.split_indices["val"])


def test_image_folder_train_val_test_subfolders(tmp_path):
    _png_tree(tmp_path / "train", per_class=4)
    _png_tree(tmp_path / "val", classes=("ant", "cat"), per_class=2)
    _png_tree(tmp_path / "test", per_class=1)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (12, 4, 3)
    assert sorted(dm.val_set.labels.tolist()) == [0, 0, 2, 2]  # train's class indices, bee absent


def test_image_folder_missing(tmp_path):
    with pytest.raises(DataNotFoundError, match="data.root"):
        ImageFolderDataModule(str(tmp_path / "none")).setup()
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        ImageFolderDataModule(str(tmp_path), image_size=0)


def _cifar_tree(folder, n=10):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n)), b"batch_label": name.encode()}
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, fh)


def test_cifar10_pickle_format(tmp_path):
    _cifar_tree(tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(str(tmp_path), val_size=10, batch_size=8, normalize=True, augment=True)
    dm.setup()
    assert dm.num_classes == 10 and dm.class_names[1] == "automobile" and dm.input_shape == (3, 32, 32)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 10)
    x, y = next(iter(dm.test_dataloader()))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")[b"data"][:8].reshape(8, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (torch.from_numpy(raw).float() / 255 - mean) / std, atol=1e-5, rtol=0)
    assert y.tolist() == list(range(8))


def test_cifar10_missing_and_unsafe_pickle(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        CIFAR10DataModule(str(tmp_path)).setup()
    assert "data_batch_1" in str(info.value) and "batches.meta" in str(info.value) and "data.root" in str(info.value)
    _cifar_tree(tmp_path / "c")
    with open(tmp_path / "c" / "test_batch", "wb") as fh:
        pickle.dump({b"data": os.getcwd, b"labels": []}, fh)  # would call a function on load if trusted
    with pytest.raises(DataNotFoundError, match="refusing"):
        CIFAR10DataModule(str(tmp_path / "c"), val_size=5).setup()


def test_text_file_csv_and_jsonl(tmp_path):
    import csv

    rows = [{"text": f"sample {i} about {lab}", "label": lab} for i, lab in enumerate(["spam", "ham", "eggs"] * 10)]
    with open(tmp_path / "train.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    dm = TextFileDataModule(str(tmp_path / "train.csv"), val_fraction=0.2, test_fraction=0.1, batch_size=4)
    assert dm.class_names == ["eggs", "ham", "spam"] and dm.num_classes == 3
    assert (len(dm.texts("train")), len(dm.texts("val")), len(dm.texts("test"))) == (21, 6, 3)
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"text", "labels"} and b["labels"].dtype == torch.int64
    for t, y in zip(dm.texts("val"), dm.labels("val")):
        assert t.endswith(dm.class_names[y])

    with open(tmp_path / "train.jsonl", "w") as fh:
        for i in range(30):
            fh.write(json.dumps({"body": f"row {i} number {i % 11}", "y": i % 11}) + "\n")
    with open(tmp_path / "val.jsonl", "w") as fh:
        fh.write(json.dumps({"body": "row x number 10", "y": 10}) + "\n")
    dm = TextFileDataModule(str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.jsonl"), text_field="body",
                            label_field="y", tokenizer="wordpiece", vocab_size=60, max_length=8, cache_dir=str(tmp_path / "c"))
    assert dm.class_names == [str(i) for i in range(11)]  # numeric order: 10 after 9
    assert dm.labels("val") == [10] and len(dm.texts("test")) == 3
    s = dm.sample_inputs(1)
    assert s["input_ids"].shape[0] == 1 and s["input_ids"].shape[1] <= 8


def test_text_file_errors(tmp_path):
    with open(tmp_path / "train.jsonl", "w") as fh:
        fh.write(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b", "label": "y"}) + "\n")
    with open(tmp_path / "val.jsonl", "w") as fh:
        fh.write(json.dumps({"text": "c", "label": "z"}) + "\n")
    with pytest.raises(ConfigError, match="never occur in the training split"):
        TextFileDataModule(str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.jsonl")).setup()
    with pytest.raises(ConfigError, match=r"data\.text_field='content'.*fields there: \['label', 'text'\]"):
        TextFileDataModule(str(tmp_path / "train.jsonl"), text_field="content", val_fraction=0.0, test_fraction=0.0).setup()
    with pytest.raises(DataNotFoundError, match="data.train_path"):
        TextFileDataModule(str(tmp_path / "absent.csv")).setup()
    with pytest.raises(ConfigError, match=r"data\.train_path"):
        TextFileDataModule(str(tmp_path / "train.txt"))


@needs_fmnist
def test_lightning_trainer_consumes_datamodule(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self, n_in, n_cls):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n_in, n_cls))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = FashionMNISTDataModule(resize=16, augment=True, batch_size=32, **SMALL)
    c, h, w = dm.input_shape
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(Tiny(c * h * w, dm.num_classes), datamodule=dm)
    assert trainer.global_step == 3 and "val_loss" in trainer.callback_metrics
    assert dm.hparams["resize"] == 16 and dm.hparams["augment"] is True


@needs_fmnist
def test_fmnist_datamodule_pickles_after_setup():
    """ddp_spawn (and a Hydra multirun with DDP) pickles the datamodule after it was set up."""
    dm = FashionMNISTDataModule(limit_train=128, limit_val=32, limit_test=32)
    dm.setup("fit")
    clone = pickle.loads(pickle.dumps(dm))
    assert torch.equal(clone._pool_images(), dm._pool_images())
    assert len(clone.train_dataloader().dataset) == 128
