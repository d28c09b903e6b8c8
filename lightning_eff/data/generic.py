"""Datamodules for users' own data, on the same code paths as the defaults:
an image folder (``class/xxx.png``), CIFAR-10 in its python-pickle format, and CSV/JSONL text.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_eff.errors import ConfigError, DataNotFoundError
from lightning_eff.validation import check_bool, check_choice, check_int

from .common import (
    ImageTensorDataModule,
    TextClassificationDataModule,
    check_fractions,
    check_path,
    missing_data_message,
    resolve_root,
    split_three,
    take_limit,
)

__all__ = ["ImageFolderDataModule", "CIFAR10DataModule", "TextFileDataModule", "CIFAR10_MEAN", "CIFAR10_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # training-set channel statistics (Krizhevsky, 2009)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def _take(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``images[index]`` as a picklable callable's body (the unlabeled pool of ``limit_train``)."""
    return images[index]


class ImageFolderDataModule(ImageTensorDataModule):
    """Images in ``root/<class>/<file>`` (``torchvision.datasets.ImageFolder``), loaded once into memory.

    If ``root`` has ``train/`` (and optionally ``val/``, ``test/``) subfolders, those are the
    splits; a missing ``val/`` or ``test/`` is carved out of ``train/`` by the fractions. Without
    ``train/``, ``root`` itself is split. Normalisation uses the train split's channel mean/std.

    Args:
        root: the image folder.
        image_size: every image is resized to ``image_size x image_size`` once at load time.
        channels: 1 (grey, ``"L"``) or 3 (``"RGB"``).
        val_fraction, test_fraction: seeded split fractions (for splits without their folder).
        seed, batch_size, eval_batch_size, normalize, augment, limit_*, num_workers, label_fraction,
            train_transform: as in :class:`~lightning_eff.data.FashionMNISTDataModule`.

    Raises:
        ConfigError: an option is invalid. DataNotFoundError: at :meth:`setup`, no images found.
    """

    def __init__(self, root: str, image_size: int = 32, channels: int = 3, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, seed: int = 0, batch_size: int = 64, eval_batch_size: int | None = None,
                 normalize: bool = True, augment: bool = False, limit_train: int | None = None,
                 limit_val: int | None = None, limit_test: int | None = None, num_workers: int = 0,
                 label_fraction: float | None = None, train_transform=None):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, augment=augment,
                         limit_train=limit_train, limit_val=limit_val, limit_test=limit_test, num_workers=num_workers,
                         label_fraction=label_fraction, train_transform=train_transform)
        self.save_hyperparameters(ignore=["train_transform"])
        self.root = check_path("data.root", root)
        self.image_size = check_int("data.image_size", image_size, low=4, high=1024)
        self.channels = check_choice("data.channels", channels, [1, 3])
        self.val_fraction, self.test_fraction = check_fractions(val_fraction, test_fraction)
        self.normalize = check_bool("data.normalize", normalize)
        self._input_shape = (self.channels, self.image_size, self.image_size)

    def _read_folder(self, folder: Path, class_to_idx: dict[str, int] | None):
        from PIL import Image
        from torchvision.datasets import ImageFolder
        from torchvision.transforms.functional import pil_to_tensor

        if class_to_idx is None:
            ds = ImageFolder(str(folder))
        else:  # val/test folders must use the train classes; a class may be absent there
            ds = ImageFolder(str(folder), allow_empty=True)
            unknown = sorted(set(ds.classes) - set(class_to_idx))
            if unknown:
                raise DataNotFoundError(f"{folder} has classes {unknown} that train/ lacks (train classes: {sorted(class_to_idx)}).")
            ds.samples = [(p, class_to_idx[ds.classes[y]]) for p, y in ds.samples]
        mode, size = ("L" if self.channels == 1 else "RGB"), (self.image_size, self.image_size)
        images = torch.empty((len(ds.samples), self.channels, *size), dtype=torch.uint8)
        for i, (path, _) in enumerate(ds.samples):
            with Image.open(path) as im:
                images[i] = pil_to_tensor(im.convert(mode).resize(size, Image.Resampling.BILINEAR))
        labels = torch.as_tensor([y for _, y in ds.samples], dtype=torch.long)
        return images, labels, ds.classes if class_to_idx is None else None

    def _load(self) -> None:
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(missing_data_message("Image folder", [root], apt_package=None, option="data.root"))
        base = root / "train" if (root / "train").is_dir() else root
        try:
            x, y, classes = self._read_folder(base, None)
        except FileNotFoundError as exc:  # ImageFolder: no class folders / no images
            raise DataNotFoundError(f"{exc}. Expected {base}/<class>/<image>.png|jpg; set data.root.") from exc
        self._class_names = list(classes)
        n = len(y)
        has = {s: base is not root and (root / s).is_dir() for s in ("val", "test")}
        train, val, test = split_three(
            n, 0 if has["val"] else int(round(n * self.val_fraction)), 0 if has["test"] else int(round(n * self.test_fraction)), self.seed
        )
        parts = {"train": (x, y, train), "val": (x, y, val), "test": (x, y, test)}
        mapping = {c: i for i, c in enumerate(classes)}
        for s in ("val", "test"):
            if has[s]:
                xs, ys, _ = self._read_folder(root / s, mapping)
                parts[s] = (xs, ys, np.arange(len(ys)))
        limits = {"val": self.limit_val, "test": self.limit_test}
        parts = {k: (a, b, self._keep_train(i, b[torch.as_tensor(i, dtype=torch.long)].numpy()) if k == "train"
                     else take_limit(i, limits[k], self.seed)) for k, (a, b, i) in parts.items()}
        self.split_indices = {k: i for k, (_, _, i) in parts.items()}
        mean = std = None
        if self.normalize:
            tr = x[torch.as_tensor(parts["train"][2], dtype=torch.long)].float().div_(255)
            mean = tr.mean(dim=(0, 2, 3)).tolist()
            std = tr.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        kw = dict(channels=self.channels, mean=mean, std=std, pad=max(2, min(4, self.image_size // 8)))
        self.train_set = self._make_set(*parts["train"], train=True, **kw)
        self.val_set = self._make_set(*parts["val"], train=False, **kw)
        self.test_set = self._make_set(*parts["test"], train=False, **kw)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches without executing arbitrary code: only NumPy array reconstruction."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            d = _NumpyOnlyUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataNotFoundError(f"{path} is not a CIFAR-10 python batch ({exc}); use the 'CIFAR-10 python version' files.") from exc
    if not isinstance(d, dict):
        raise DataNotFoundError(f"{path} does not hold a dict (CIFAR-10 python format expected).")
    return d


class CIFAR10DataModule(ImageTensorDataModule):
    """CIFAR-10 (Krizhevsky, 2009) from a local copy of the python-pickle version.

    Args:
        root: folder with ``data_batch_1..5``, ``test_batch``, ``batches.meta`` (directly or in
            ``cifar-10-batches-py/``).
        batch_size, eval_batch_size, val_size, seed, normalize, augment (4 px crop + flip),
            limit_*, num_workers, label_fraction, train_transform: as in
            :class:`~lightning_eff.data.FashionMNISTDataModule`.

    Raises:
        ConfigError: an option is invalid. DataNotFoundError: at :meth:`setup`, files missing
            (the message lists them) or not in the pickle format.
    """

    def __init__(self, root: str, batch_size: int = 128, eval_batch_size: int | None = None, val_size: int = 5000,
                 seed: int = 0, normalize: bool = True, augment: bool = False, limit_train: int | None = None,
                 limit_val: int | None = None, limit_test: int | None = None, num_workers: int = 0,
                 label_fraction: float | None = None, train_transform=None):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, augment=augment,
                         limit_train=limit_train, limit_val=limit_val, limit_test=limit_test, num_workers=num_workers,
                         label_fraction=label_fraction, train_transform=train_transform)
        self.save_hyperparameters(ignore=["train_transform"])
        self.root = check_path("data.root", root)
        self.val_size = check_int("data.val_size", val_size, low=0)
        self.normalize = check_bool("data.normalize", normalize)
        self._input_shape = (3, 32, 32)

    def _load(self) -> None:
        folder = resolve_root(self.root, self.root, CIFAR10_FILES, dataset="CIFAR-10 (python version)",
                              subdirs=("", "cifar-10-batches-py"))
        meta = _load_cifar_batch(folder / "batches.meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])]

        def arrays(names):
            xs, ys = [], []
            for name in names:
                d = _load_cifar_batch(folder / name)
                if b"data" not in d or b"labels" not in d:
                    raise DataNotFoundError(f"{folder / name} lacks b'data'/b'labels' (keys: {sorted(d)}).")
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[b"labels"], dtype=np.int64))
            return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

        xtr, ytr = arrays(CIFAR10_FILES[:5])
        xte, yte = arrays(["test_batch"])
        if not names or int(max(ytr.max(), yte.max())) >= len(names):
            raise DataNotFoundError(f"{folder / 'batches.meta'} label_names do not cover the labels in the batches.")
        if self.val_size >= len(ytr):
            raise ConfigError(f"data.val_size={self.val_size} must be below the {len(ytr)} training images.")
        train, val, _ = split_three(len(ytr), self.val_size, 0, self.seed)
        kept = self._keep_train(train, ytr[torch.as_tensor(train, dtype=torch.long)].numpy())
        val = take_limit(val, self.limit_val, self.seed)
        pool, train = np.setdiff1d(train, kept), kept  # left out by limit_train: the pseudo-label pool
        test = take_limit(np.arange(len(yte)), self.limit_test, 0)
        self.split_indices = {"train": train, "val": val, "test": test}
        self._class_names = names
        self._pool_images = functools.partial(_take, xtr, torch.as_tensor(pool, dtype=torch.long))  # picklable (ddp_spawn)
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if self.normalize else (None, None)
        kw = dict(channels=3, mean=mean, std=std, pad=4)
        self.train_set = self._make_set(xtr, ytr, train, train=True, **kw)
        self.val_set = self._make_set(xtr, ytr, val, train=False, **kw)
        self.test_set = self._make_set(xte, yte, test, train=False, **kw)


def _read_records(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    if not path.is_file():
        raise DataNotFoundError(missing_data_message("Text data", [path], apt_package=None, option="data.train_path/val_path/test_path"))
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ConfigError(f"{path}: unsupported extension {suffix!r}; use .csv or .jsonl.")
    with open(path, encoding="utf-8", newline="") as fh:
        if suffix == ".csv":
            rows = list(csv.DictReader(fh))
        else:
            rows = []
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataNotFoundError(f"{path}:{lineno} is not valid JSON ({exc}).") from exc
    texts, labels = [], []
    for lineno, row in enumerate(rows, 1):
        for opt, field in (("data.text_field", text_field), ("data.label_field", label_field)):
            if not isinstance(row, dict) or field not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ConfigError(f"{opt}={field!r} is missing in record {lineno} of {path}; fields there: {keys}.")
        texts.append(str(row[text_field]))
        labels.append(row[label_field])
    return texts, labels


def _class_order(labels: list) -> list:
    """Sorted distinct labels: numerically when all are integers (``"10"`` after ``"9"``), else as strings."""
    distinct = set(labels)
    try:
        as_int = {v: int(v) for v in distinct if not isinstance(v, bool) and str(int(v)) == str(v).strip()}
    except (TypeError, ValueError):
        as_int = {}
    if len(as_int) == len(distinct):
        return sorted(distinct, key=lambda v: (as_int[v], str(v)))
    return sorted(distinct, key=str)


class TextFileDataModule(TextClassificationDataModule):
    """Text classification from ``.csv`` (header row) or ``.jsonl`` files.

    Labels may be strings or integers; classes are the distinct *training* labels, sorted
    (numerically when all are integers), so class indices never depend on file order.

    Args:
        train_path: training file; when ``val_path``/``test_path`` are not given, those splits
            are carved out of it by ``val_fraction``/``test_fraction`` (seeded).
        text_field, label_field: column / key names.
        tokenizer, vocab_size, max_length, batch_size, eval_batch_size, seed, limit_*, cache_dir,
            num_workers, bucket_by_length, label_fraction, train_transform: as in
            :class:`~lightning_eff.data.WordNetSupersenseDataModule` (``train_transform``: text augmentation of
            the raw training strings before tokenization; val/test never augmented).

    Raises:
        ConfigError: an option is invalid, a field is missing, or val/test has labels train lacks.
        DataNotFoundError: at :meth:`setup`, a file is missing.
    """

    def __init__(self, train_path: str, val_path: str | None = None, test_path: str | None = None,
                 text_field: str = "text", label_field: str = "label", tokenizer: str = "raw", vocab_size: int = 8000,
                 max_length: int = 128, batch_size: int = 64, eval_batch_size: int | None = None,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, limit_train: int | None = None,
                 limit_val: int | None = None, limit_test: int | None = None, cache_dir: str | None = None,
                 num_workers: int = 0, bucket_by_length: bool = False, label_fraction: float | None = None,
                 train_transform: Any = None):
        super().__init__(tokenizer=tokenizer, vocab_size=vocab_size, max_length=max_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, seed=seed, limit_train=limit_train, limit_val=limit_val,
                         limit_test=limit_test, cache_dir=cache_dir, num_workers=num_workers,
                         bucket_by_length=bucket_by_length, label_fraction=label_fraction,
                         train_transform=train_transform)
        self.save_hyperparameters(ignore=["train_transform"])
        self.paths = {"train": check_path("data.train_path", train_path), "val": check_path("data.val_path", val_path, allow_none=True),
                      "test": check_path("data.test_path", test_path, allow_none=True)}
        for k, p in self.paths.items():
            if p is not None and Path(p).suffix.lower() not in (".csv", ".jsonl"):
                raise ConfigError(f"data.{k}_path={p!r} must end in .csv or .jsonl.")
        for opt, v in (("data.text_field", text_field), ("data.label_field", label_field)):
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{opt}={v!r} must be a non-empty column/key name.")
        self.text_field, self.label_field = text_field, label_field
        self.val_fraction, self.test_fraction = check_fractions(val_fraction, test_fraction)

    def _read(self):
        read = {k: _read_records(Path(p).expanduser(), self.text_field, self.label_field)
                for k, p in self.paths.items() if p is not None}
        texts, raw = read["train"]
        n = len(texts)
        train, val, test = split_three(n, 0 if "val" in read else int(round(n * self.val_fraction)),
                                       0 if "test" in read else int(round(n * self.test_fraction)), self.seed)
        order = _class_order([raw[i] for i in train])
        to_idx = {v: i for i, v in enumerate(order)}
        self.split_indices = {"train": train, "val": val, "test": test}
        splits = {}
        for name, idx in self.split_indices.items():
            if name != "train" and name in read:  # a split with its own file
                t, r = read[name]
                self.split_indices[name] = np.arange(len(t))
            else:
                t, r = [texts[i] for i in idx], [raw[i] for i in idx]
            missing = sorted({str(v) for v in r if v not in to_idx})
            if missing:
                raise ConfigError(f"data.label_field={self.label_field!r}: {name} labels {missing[:10]} never occur in the training split (classes: {[str(c) for c in order]}).")
            splits[name] = (t, [to_idx[v] for v in r])
        return splits, [str(c) for c in order]
