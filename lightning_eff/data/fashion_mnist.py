"""Fashion-MNIST (Xiao et al., 2017, arXiv:1708.07747) from the Debian package ``dataset-fashion-mnist``.

The four gzip IDX files are parsed directly (gzip + NumPy), kept as ``uint8`` tensors, resized
once when ``resize`` is set, and normalised/augmented per batch (see :mod:`.common`).
"""
from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from lightning_eff.errors import ConfigError, DataNotFoundError
from lightning_eff.validation import check_bool, check_choice, check_int

from .common import (
    ImageTensorDataModule,
    check_path,
    resize_uint8,
    resolve_root,
    split_three,
    take_limit,
)

__all__ = ["FashionMNISTDataModule", "read_idx", "FASHION_MNIST_CLASSES", "DEFAULT_FASHION_MNIST_ROOT"]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Statistics of the 60k training images in [0, 1] (the values commonly quoted for the dataset).
MEAN, STD = 0.2860, 0.3530
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# IDX magic: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
_MAGIC = {3: 0x00000803, 1: 0x00000801}
_REINSTALL = "Reinstall with: apt-get update && apt-get install --reinstall -y dataset-fashion-mnist (or fix data.root)."


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Parse a (gzipped) IDX file of unsigned bytes with ``ndim`` dimensions.

    Raises:
        DataNotFoundError: the file is not gzip, is truncated, or has a wrong magic number or
            size; the message names the file and how to reinstall it.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataNotFoundError(f"{path} is corrupt or not a gzip IDX file ({exc}). {_REINSTALL}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataNotFoundError(f"{path} is truncated ({len(raw)} bytes, header needs {header}). {_REINSTALL}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _MAGIC[ndim]:
        raise DataNotFoundError(
            f"{path} has IDX magic 0x{magic:08x}, expected 0x{_MAGIC[ndim]:08x} (uint8, {ndim}-D). {_REINSTALL}"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataNotFoundError(f"{path} holds {len(raw)} bytes but its header {dims} implies {expected}. {_REINSTALL}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_arrays(folder: str, _mtimes: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read the four files once per process (keyed by folder and mtimes so a changed file is re-read)."""
    f = Path(folder)
    xtr, ytr = read_idx(f / FILES["train_images"], 3), read_idx(f / FILES["train_labels"], 1)
    xte, yte = read_idx(f / FILES["test_images"], 3), read_idx(f / FILES["test_labels"], 1)
    for x, y, name in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if len(x) != len(y):
            raise DataNotFoundError(f"{name} images ({len(x)}) and labels ({len(y)}) differ in count. {_REINSTALL}")
        if y.size and int(y.max()) >= 10:
            raise DataNotFoundError(f"{name} labels contain {int(y.max())}, outside 0..9. {_REINSTALL}")
    to_t = lambda a: torch.from_numpy(a.copy())  # noqa: E731  (frombuffer arrays are read-only)
    return to_t(xtr)[:, None], to_t(ytr).long(), to_t(xte)[:, None], to_t(yte).long()


def _pool_resized(images: torch.Tensor, index: torch.Tensor, size: int | None) -> torch.Tensor:
    """The unlabeled pool's images at the training size (picklable, unlike a lambda)."""
    return resize_uint8(images[index], size)


class FashionMNISTDataModule(ImageTensorDataModule):
    """Fashion-MNIST: 60k train (minus ``val_size`` held out) / 10k test, 10 classes, 28x28 grey.

    Batches are ``(images float32 [B,C,H,W], labels int64 [B])``.

    Args:
        root: folder with the four ``*-ubyte.gz`` files; default ``/usr/share/datasets/fashion-mnist/``.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (default ``batch_size``).
        val_size: images of the 60k training set held out for validation (seeded split).
        seed: split seed (same seed -> same indices in every process).
        resize: output side length (e.g. 32 for ImageNet-style stems), or ``None`` for 28.
        channels: 1 (grey) or 3 (grey replicated to RGB).
        normalize: subtract the dataset mean 0.2860 and divide by std 0.3530 (else ``[0, 1]``).
        augment: random crop (2-4 px zero padding, scaled with image size) + horizontal flip,
            training batches only.
        limit_train, limit_val, limit_test: keep a deterministic subset of that many examples.
        label_fraction: instead of ``limit_train``, keep this fraction (0, 1] of every class of the training
            split (label-efficiency runs: 0.01, 0.1, 1.0); the rest forms the unlabeled pool.
        train_transform: augmentation of the training images (an
            :class:`~lightning_eff.learning.augment.vision.ImageAugment`, a ``_target_`` node of one, or a
            list of ops); validation and test images are never transformed.
        num_workers: DataLoader workers (0 is fastest here: batches are a few tensor ops).

    Raises:
        ConfigError: an option is invalid (named ``data.<arg>``).
        DataNotFoundError: at :meth:`setup`, files missing or corrupt.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        seed: int = 0,
        resize: int | None = None,
        channels: int = 1,
        normalize: bool = True,
        augment: bool = False,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        num_workers: int = 0,
        label_fraction: float | None = None,
        train_transform=None,
    ):
        super().__init__(
            batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, augment=augment,
            limit_train=limit_train, limit_val=limit_val, limit_test=limit_test, num_workers=num_workers,
            label_fraction=label_fraction, train_transform=train_transform,
        )
        self.save_hyperparameters(ignore=["train_transform"])
        self.root = check_path("data.root", root, allow_none=True)
        self.val_size = check_int("data.val_size", val_size, low=0, high=59_999)
        self.resize = check_int("data.resize", resize, low=8, high=512, allow_none=True)
        self.channels = check_choice("data.channels", channels, [1, 3])
        self.normalize = check_bool("data.normalize", normalize)
        self._class_names = list(FASHION_MNIST_CLASSES)
        self._input_shape = (self.channels, self.resize or 28, self.resize or 28)

    def _load(self) -> None:
        folder = resolve_root(
            self.root, DEFAULT_FASHION_MNIST_ROOT, list(FILES.values()),
            dataset="Fashion-MNIST", apt_package="dataset-fashion-mnist",
        )
        mtimes = tuple((folder / f).stat().st_mtime_ns for f in FILES.values())
        xtr, ytr, xte, yte = _load_arrays(str(folder.resolve()), mtimes)
        if self.val_size >= len(xtr):  # possible with a custom root holding a small file set
            raise ConfigError(f"data.val_size={self.val_size} must be below the {len(xtr)} training images in {folder}.")
        train_idx, val_idx, _ = split_three(len(xtr), self.val_size, 0, self.seed)
        test_idx = np.arange(len(xte))
        kept = self._keep_train(train_idx, ytr[torch.as_tensor(train_idx, dtype=torch.long)].numpy())
        pool_idx = np.setdiff1d(train_idx, kept)  # left out by limit_train: the pseudo-label pool
        train_idx = kept
        val_idx = take_limit(val_idx, self.limit_val, self.seed)
        test_idx = take_limit(test_idx, self.limit_test, 0)  # test subset independent of the split seed
        self.split_indices = {"train": train_idx, "val": val_idx, "test": test_idx}

        size = self.resize or 28
        pad = max(2, min(4, size // 8))  # 3 px at 28, 4 px at 32+: ~10% shift like the CIFAR recipe
        mean, std = ((MEAN,) * self.channels, (STD,) * self.channels) if self.normalize else (None, None)
        kw = dict(channels=self.channels, mean=mean, std=std, pad=pad)
        # Resize only the rows we keep (cheap with limit_*), once, then batches are pure indexing.
        src_tr = torch.as_tensor(np.concatenate([train_idx, val_idx]), dtype=torch.long)
        imgs_tr = resize_uint8(xtr[src_tr], size)
        n_tr = len(train_idx)
        local_tr, local_val = np.arange(n_tr), np.arange(n_tr, n_tr + len(val_idx))
        labels_tr = ytr[src_tr]
        imgs_te = resize_uint8(xte[torch.as_tensor(test_idx, dtype=torch.long)], size)
        labels_te = yte[torch.as_tensor(test_idx, dtype=torch.long)]
        self.train_set = self._make_set(imgs_tr, labels_tr, local_tr, train=True, **kw)
        # a partial of a module-level function, not a lambda: ddp_spawn pickles the datamodule
        self._pool_images = functools.partial(_pool_resized, xtr, torch.as_tensor(pool_idx, dtype=torch.long), size)
        self.val_set = self._make_set(imgs_tr, labels_tr, local_val, train=False, **kw)
        self.test_set = self._make_set(imgs_te, labels_te, np.arange(len(test_idx)), train=False, **kw)
