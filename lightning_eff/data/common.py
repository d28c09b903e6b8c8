"""Shared pieces of the datamodules: path resolution, missing-data errors, deterministic splits,
and the in-memory image base class.

Why in-memory tensors: every dataset the project ships with (Fashion-MNIST, CIFAR-10, small
image folders) fits in RAM as ``uint8``. Keeping it there, resizing once, and turning a whole
batch into floats (normalise, crop, flip) with a handful of tensor ops makes the loader cost a
few milliseconds per epoch instead of the seconds a per-sample PIL pipeline costs on 2 cores.
"""
from __future__ import annotations

import abc
import copy
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_eff.data.indexed import IndexCollate
from lightning_eff.errors import ConfigError, DataNotFoundError
from lightning_eff.validation import check_bool, check_choice, check_int, check_number

__all__ = [
    "check_path",
    "resolve_root",
    "missing_data_message",
    "seeded_permutation",
    "split_three",
    "take_limit",
    "take_fraction",
    "resize_uint8",
    "BatchGatherDataset",
    "ImageTensorDataModule",
    "TextClassificationDataModule",
    "check_fractions",
    "fraction_split",
]


def missing_data_message(dataset: str, looked_for: Sequence[Path | str], *, apt_package: str | None, option: str) -> str:
    """Build the message of a :class:`DataNotFoundError`: what is missing and exactly how to fix it."""
    lines = [f"{dataset} files not found. Looked for:"]
    lines += [f"  - {p}" for p in looked_for]
    if apt_package:
        lines.append(f"Install them with: apt-get update && apt-get install -y {apt_package}")
        lines.append(f"or point {option}=/path at a folder holding these files.")
    else:
        lines.append(f"Set {option}=/path to where these files are.")
    return "\n".join(lines)


def check_path(name: str, value, *, allow_none: bool = False) -> str | None:
    """Check that an option holds a path (a non-empty string or ``os.PathLike``); return it as ``str``."""
    if value is None and allow_none:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        allowed = "a path string or null" if allow_none else "a path string"
        raise ConfigError(f"{name}={value!r} must be {allowed} ({type(value).__name__} given).")
    return value


def resolve_root(
    root: str | os.PathLike | None,
    default: str | os.PathLike,
    required: Sequence[str],
    *,
    dataset: str,
    apt_package: str | None = None,
    option: str = "data.root",
    subdirs: Sequence[str] = ("",),
) -> Path:
    """Return the first folder (``root`` or ``default``, each optionally with one of ``subdirs``)
    that holds every file in ``required``.

    Raises:
        DataNotFoundError: no candidate holds all files; the message lists every path looked for,
            the apt command (when the data comes from a Debian package) and the option to set.
    """
    base = Path(root if root is not None else default).expanduser()
    candidates = [base / s if s else base for s in subdirs]
    for folder in candidates:
        if all((folder / name).is_file() for name in required):
            return folder
    looked = [folder / name for folder in candidates for name in required if not (folder / name).is_file()]
    raise DataNotFoundError(missing_data_message(dataset, looked, apt_package=apt_package, option=option))


def seeded_permutation(n: int, seed: int) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on ``(n, seed)``.

    NumPy's PCG64 stream is specified and platform independent, so every process (DDP ranks,
    dataloader workers, a rerun next week) gets the same order; Python's ``hash()`` would not.
    """
    return np.random.default_rng(np.random.SeedSequence(seed)).permutation(n)


def split_three(n: int, n_val: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministically split ``range(n)`` into sorted, disjoint train/val/test index arrays."""
    perm = seeded_permutation(n, seed)
    val, test, train = perm[:n_val], perm[n_val : n_val + n_test], perm[n_val + n_test :]
    return np.sort(train), np.sort(val), np.sort(test)


def take_limit(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Keep a deterministic random subset of ``limit`` indices (all when ``None``), sorted.

    A random subset rather than the first ``limit`` keeps the class mix of a quick run close to
    the full split's.
    """
    if limit is None or limit >= len(indices):
        return indices
    keep = seeded_permutation(len(indices), seed + 7919)[:limit]
    return np.sort(indices[keep])


def take_fraction(indices: np.ndarray, labels, fraction: float, seed: int) -> np.ndarray:
    """Keep ``fraction`` of ``indices`` per class (at least one example of each class present), sorted.

    Why stratified: with 1% of Fashion-MNIST's labels (550 images) a plain random subset can be
    ±25% off in a class's count; label-efficiency numbers (SimCLR's 1% / 10% protocol) are
    measured on class-balanced subsets, so every run of a sweep sees the same class mix.
    """
    labels = np.asarray(labels)
    if fraction >= 1.0:
        return indices
    keep = []
    for c in np.unique(labels):
        members = indices[labels == c]
        n = max(1, int(round(fraction * len(members))))
        keep.append(members[seeded_permutation(len(members), seed + 104729 + int(c))[:n]])
    return np.sort(np.concatenate(keep)) if keep else indices


def check_label_options(limit_train, label_fraction) -> tuple[int | None, float | None]:
    """``data.limit_train`` (a count) and ``data.label_fraction`` (a fraction in (0, 1]) are alternatives."""
    limit = check_int("data.limit_train", limit_train, low=1, allow_none=True)
    fraction = check_number("data.label_fraction", label_fraction, low=0.0, low_inclusive=False, high=1.0,
                            allow_none=True)
    if limit is not None and fraction is not None:
        raise ConfigError(f"data.limit_train={limit} and data.label_fraction={fraction} both choose the training "
                          "subset; give one (label_fraction keeps that share of every class).")
    return limit, None if fraction is None else float(fraction)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """Resize a ``uint8 [N,C,H,W]`` tensor to ``size x size`` once, bilinearly, in chunks (bounded memory)."""
    if images.shape[-2:] == (size, size):
        return images
    shrink = size < max(images.shape[-2:])
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].float()
        # antialias only matters (and only helps) when shrinking
        part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


class BatchGatherDataset(Dataset):
    """A dataset whose items are just indices; :meth:`collate` gathers a whole batch at once.

    The standard ``DataLoader`` + sampler machinery stays untouched (so Lightning can inject a
    ``DistributedSampler`` under DDP), while all per-sample work happens as batched tensor ops.

    Args:
        images: ``uint8 [N,C0,H,W]`` storage (C0 is 1 or 3).
        labels: ``int64 [N]``.
        channels: output channels; a 1-channel store is expanded to 3 per batch (no 3x memory).
        mean, std: per-output-channel normalisation, or ``None`` for plain ``[0, 1]`` scaling.
        augment: random crop (zero padding ``pad``) + horizontal flip per sample.
        transform: a :class:`~lightning_eff.learning.augment.vision.ImageAugment` (training sets only):
            its ``images`` run on the uint8 batch, its ``normalized`` on the float batch.
    """

    def __init__(self, images, labels, *, channels, mean=None, std=None, augment=False, pad=4, transform=None):
        self.images, self.labels = images, labels
        self.channels, self.augment, self.pad = channels, augment, pad
        self.train_transform = transform
        shape = (1, channels, 1, 1)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(shape)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(shape)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> int:
        return index

    def transform(self, x: torch.Tensor, augment: bool | None = None) -> torch.Tensor:
        """uint8 batch -> float32 model input (augment if enabled, scale, channel-expand, normalise).

        ``augment=False`` (``sample_inputs``, the pseudo-label pool) skips the built-in crop/flip and the
        ``train_transform`` alike.
        """
        randomize = augment is None or augment
        tf = self.train_transform if randomize else None
        if self.augment if augment is None else augment:
            x = random_crop_flip(x, self.pad)
        if tf is not None:
            x = tf.images(x)
        x = x.float()
        if self.mean is None:
            x = x.div_(255.0)
        elif x.shape[1] == 1:
            # grey store: normalise the single channel (mean/std are equal across replicas), expand after
            x = x.mul_(1.0 / (255.0 * float(self.std[0, 0]))).sub_(float(self.mean[0, 0] / self.std[0, 0]))
        else:
            x = x.div_(255.0).sub_(self.mean).div_(self.std)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        x = x.contiguous()
        return x if tf is None else tf.normalized(x)

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        # A batch is < 1 MB of work: an intra-op thread pool costs more than it saves, and when
        # the other cores are busy (training, other jobs) its spin-waits made an epoch 3-10x
        # slower in measurements. Run single-threaded and restore the caller's setting.
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            return self.transform(self.images[idx]), self.labels[idx]
        finally:
            if threads > 1:
                torch.set_num_threads(threads)


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random crop after zero padding plus random horizontal flip, batched.

    ``unfold`` exposes every crop window as a view, so one advanced-indexing gather picks the
    ``B`` crops (no per-sample Python loop); flips touch only the selected half.
    """
    b, c, h, w = x.shape
    padded = x.new_zeros((b, c, h + 2 * pad, w + 2 * pad))
    padded[:, :, pad : pad + h, pad : pad + w] = x
    oy = torch.randint(0, 2 * pad + 1, (b,))
    ox = torch.randint(0, 2 * pad + 1, (b,))
    out = padded.unfold(2, h, 1).unfold(3, w, 1)[torch.arange(b), :, oy, ox]
    flip = (torch.rand(b) < 0.5).nonzero().squeeze(1)
    out[flip] = out[flip].flip(-1)
    return out


class ImageTensorDataModule(L.LightningDataModule, abc.ABC):
    """Base of the image datamodules: subclasses implement :meth:`_load` (read files, split,
    build the three datasets with :meth:`_make_set`) and set ``_class_names`` unless static.

    After :meth:`setup`: ``train_set``/``val_set``/``test_set`` (:class:`BatchGatherDataset`),
    ``split_indices`` (``{"train","val","test"}`` -> index arrays into the source arrays),
    ``num_classes``, ``class_names``, ``input_shape`` and :meth:`sample_inputs`.
    """

    def __init__(self, *, batch_size, eval_batch_size, seed, augment, limit_train, limit_val, limit_test, num_workers,
                 label_fraction=None, train_transform=None):
        super().__init__()
        self.batch_size = check_int("data.batch_size", batch_size, low=1)
        self.eval_batch_size = check_int("data.eval_batch_size", eval_batch_size, low=1, allow_none=True) or self.batch_size
        self.seed = check_int("data.seed", seed, low=0)
        self.augment = check_bool("data.augment", augment)
        self.limit_train, self.label_fraction = check_label_options(limit_train, label_fraction)
        self.limit_val = check_int("data.limit_val", limit_val, low=1, allow_none=True)
        self.limit_test = check_int("data.limit_test", limit_test, low=1, allow_none=True)
        self.num_workers = check_int("data.num_workers", num_workers, low=0)
        from lightning_eff.data.transforms import check_image_transform

        # training images only, per sample (uint8) and per batch (after normalisation); see learning/augment/vision.py
        self.train_transform = check_image_transform("data.train_transform", train_transform)
        self._ready = False
        self._class_names: list[str] | None = None  # set in __init__ when static, else by _load
        self._input_shape: tuple[int, int, int] = (0, 0, 0)  # (C, H, W) set by each subclass __init__
        # training batches as IndexedBatch(index, batch) (offline distillation, pseudo-labels)
        self.return_index = False
        # () -> uint8 images of the training split left out by limit_train (pseudo-label pool)
        self._pool_images = None
        self._pool_set: BatchGatherDataset | None = None

    # --- subclass hooks -------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> None:
        """Read files and set ``train_set``, ``val_set``, ``test_set``, ``split_indices``."""

    # --- public API ------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """Class names in label order (reads the files only if they carry the names)."""
        if self._class_names is None:
            self.setup()
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of model inputs after resize/channels (known from the options alone)."""
        return self._input_shape

    def setup(self, stage: str | None = None) -> None:
        """Load and split once; later calls (every Lightning stage) are free."""
        if not self._ready:
            self._load()
            self._ready = True

    def sample_inputs(self, n: int = 1) -> torch.Tensor:
        """``n`` real validation images as model input ``float32 [n,C,H,W]`` (no augmentation),
        cycling through the split when it holds fewer than ``n``."""
        n = check_int("n", n, low=1)
        self.setup()
        ds = self.val_set if len(self.val_set) else self.test_set
        idx = torch.arange(n) % len(ds)
        return ds.transform(ds.images[idx], augment=False)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, self.batch_size, shuffle=True, indexed=self.return_index)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def unlabeled_set(self) -> BatchGatherDataset:
        """The pseudo-label pool: training-split images left out by ``limit_train``, labels hidden (-1).

        Raises:
            ConfigError: no pool (``data.limit_train`` unset or covering the whole split).
        """
        self.setup()
        if self._pool_set is None:
            images = self._pool_images() if self._pool_images is not None else None
            if images is None or not len(images):
                raise ConfigError(
                    f"no unlabeled pool: data.limit_train={self.limit_train} keeps the whole training split; set it "
                    "below the split size so the remaining images form the pool for pseudo-labels."
                )
            pool = copy.copy(self.train_set)
            pool.images, pool.labels, pool.augment = images, torch.full((len(images),), -1, dtype=torch.long), False
            pool.train_transform = None
            self._pool_set = pool
        return self._pool_set

    def add_pseudo_labels(self, pool_indices: torch.Tensor, labels: torch.Tensor) -> int:
        """Append pool examples ``pool_indices`` with (teacher) ``labels`` to the training set; returns its new size."""
        pool = self.unlabeled_set()
        idx = torch.as_tensor(pool_indices, dtype=torch.long)
        if idx.numel() != torch.as_tensor(labels).numel():
            raise ConfigError(f"{idx.numel()} pool indices but {torch.as_tensor(labels).numel()} labels.")
        train = copy.copy(self.train_set)
        train.images = torch.cat([self.train_set.images, pool.images[idx]])
        train.labels = torch.cat([self.train_set.labels, torch.as_tensor(labels, dtype=torch.long)])
        self.train_set = train
        return len(train)

    # --- helpers for subclasses ------------------------------------------------------------
    def _keep_train(self, indices: np.ndarray, labels) -> np.ndarray:
        """The training subset: ``limit_train`` examples (random) or ``label_fraction`` of each class."""
        if self.label_fraction is not None:
            return take_fraction(indices, labels, self.label_fraction, self.seed)
        return take_limit(indices, self.limit_train, self.seed)

    def _make_set(self, images, labels, idx, *, channels, mean, std, train: bool, pad: int) -> BatchGatherDataset:
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return BatchGatherDataset(
            images[idx_t], labels[idx_t], channels=channels, mean=mean, std=std, augment=train and self.augment, pad=pad,
            transform=self.train_transform if train else None,
        )

    def _loader(self, ds: BatchGatherDataset, batch_size: int, *, shuffle: bool, indexed: bool = False) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=IndexCollate(ds.collate) if indexed else ds.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class TextClassificationDataModule(L.LightningDataModule, abc.ABC):
    """Base of the text datamodules: subclasses implement :meth:`_read` and call
    :meth:`_finish_setup` through :meth:`setup`.

    Batches: ``{"text": list[str], "labels"}`` for ``tokenizer="raw"``, else
    ``{"input_ids", "attention_mask", "labels"}`` padded per batch (int64). After :meth:`setup`:
    ``num_classes``, ``class_names``, ``tokenizer`` (``None`` for raw), ``vocab_size``,
    :meth:`texts`, :meth:`labels`, :meth:`sample_inputs`, ``split_indices``.
    ``bucket_by_length=True`` draws training batches of similar lengths
    (:class:`~lightning_eff.data.sampling.LengthBucketSampler`, seeded by ``seed``).
    ``train_transform`` augments the raw strings of each training batch before tokenization
    (:func:`~lightning_eff.data.transforms.check_text_transform` says what it accepts); it is
    fitted (when it has ``fit``) on the training texts, and val/test, ``sample_inputs`` and the
    pseudo-label pool never see it.
    """

    def __init__(self, *, tokenizer, vocab_size, max_length, batch_size, eval_batch_size, seed,
                 limit_train, limit_val, limit_test, cache_dir, num_workers, bucket_by_length=False, label_fraction=None,
                 train_transform=None):
        super().__init__()
        from .tokenizers import check_tokenizer_option

        self.tokenizer_spec = check_tokenizer_option("data.tokenizer", tokenizer)
        self.tokenizer_vocab_size = check_int("data.vocab_size", vocab_size, low=16)
        self.max_length = check_int("data.max_length", max_length, low=3)
        self.batch_size = check_int("data.batch_size", batch_size, low=1)
        self.eval_batch_size = check_int("data.eval_batch_size", eval_batch_size, low=1, allow_none=True) or self.batch_size
        self.seed = check_int("data.seed", seed, low=0)
        self.limit_train, self.label_fraction = check_label_options(limit_train, label_fraction)
        self.limit_val = check_int("data.limit_val", limit_val, low=1, allow_none=True)
        self.limit_test = check_int("data.limit_test", limit_test, low=1, allow_none=True)
        self.cache_dir = check_path("data.cache_dir", cache_dir, allow_none=True)
        self.num_workers = check_int("data.num_workers", num_workers, low=0)
        # training batches of similar lengths (LengthBucketSampler): less padding, same epoch content
        self.bucket_by_length = check_bool("data.bucket_by_length", bucket_by_length)
        from lightning_eff.data.transforms import check_text_transform

        # list[str] -> list[str] on the raw strings of training batches only; see learning/augment/text.py
        self.train_transform = check_text_transform("data.train_transform", train_transform)
        self.tokenizer = None
        self._ready = False
        # training batches as IndexedBatch(index, batch) (offline distillation, pseudo-labels)
        self.return_index = False
        self._pool_texts: list[str] = []  # training texts left out by limit_train (pseudo-label pool)

    @abc.abstractmethod
    def _read(self) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
        """Return ``({"train"|"val"|"test": (texts, labels)}, class_names)`` before limits."""

    def setup(self, stage: str | None = None) -> None:
        """Read, split, limit, build the tokenizer (train texts only) and encode, once."""
        if self._ready:
            return
        from .tokenizers import TextDataset, load_tokenizer

        splits, self._class_names = self._read()
        self._data: dict[str, tuple[list[str], list[int]]] = {}
        limits = {"train": self.limit_train, "val": self.limit_val, "test": self.limit_test}
        self.split_indices = getattr(self, "split_indices", {})
        for name, (texts, labels) in splits.items():
            if name == "train" and self.label_fraction is not None:
                keep = take_fraction(np.arange(len(texts)), labels, self.label_fraction, self.seed)
            else:
                keep = take_limit(np.arange(len(texts)), limits[name], self.seed)
            self._data[name] = ([texts[i] for i in keep], [int(labels[i]) for i in keep])
            if name == "train":
                self._pool_texts = [texts[i] for i in np.setdiff1d(np.arange(len(texts)), keep)]
            if name in self.split_indices:  # map back to the source rows for inspection/tests
                self.split_indices[name] = self.split_indices[name][keep]
        # The vocabulary is fitted on the whole training split, *before* limit_train: a run on a slice then
        # tokenizes exactly like the full run, so a teacher trained on all the data and a student trained on
        # a slice (or the pseudo-label pool) share one vocabulary. Texts only: no labels, no val/test.
        self.tokenizer = load_tokenizer(
            self.tokenizer_spec, train_texts=splits["train"][0], vocab_size=self.tokenizer_vocab_size,
            max_length=self.max_length, cache_dir=self.cache_dir,
        )
        if hasattr(self.train_transform, "fit"):  # e.g. SwitchOut's vocabulary: the same training texts as the tokenizer's
            self.train_transform.fit(splits["train"][0])
        self.datasets = {k: TextDataset(t, y, self.tokenizer, self.max_length,
                                        transform=self.train_transform if k == "train" else None)
                         for k, (t, y) in self._data.items()}
        self._ready = True

    @property
    def class_names(self) -> list[str]:
        self.setup()
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def vocab_size(self) -> int | None:
        """Size of the tokenizer's vocabulary (with added tokens); ``None`` for ``tokenizer="raw"``."""
        self.setup()
        return None if self.tokenizer is None else len(self.tokenizer)

    def texts(self, split: str) -> list[str]:
        """The input texts of ``split`` (``"train"``, ``"val"``, ``"test"``) after limits."""
        self.setup()
        return list(self._data[check_choice("split", split, ["train", "val", "test"])][0])

    def labels(self, split: str) -> list[int]:
        """The class indices of ``split`` after limits."""
        self.setup()
        return list(self._data[check_choice("split", split, ["train", "val", "test"])][1])

    def unlabeled_set(self):
        """The pseudo-label pool: training texts left out by ``limit_train``, labels hidden (-1).

        Raises:
            ConfigError: no pool (``data.limit_train`` unset or covering the whole split).
        """
        from .tokenizers import TextDataset

        self.setup()
        if not self._pool_texts:
            raise ConfigError(
                f"no unlabeled pool: data.limit_train={self.limit_train} keeps the whole training split; set it "
                "below the split size so the remaining texts form the pool for pseudo-labels."
            )
        return TextDataset(self._pool_texts, [-1] * len(self._pool_texts), self.tokenizer, self.max_length)

    def add_pseudo_labels(self, pool_indices, labels) -> int:
        """Append pool texts ``pool_indices`` with (teacher) ``labels`` to the training set; returns its new size."""
        from .tokenizers import TextDataset

        idx = [int(i) for i in torch.as_tensor(pool_indices).tolist()]
        new_labels = [int(y) for y in torch.as_tensor(labels).tolist()]
        if len(idx) != len(new_labels):
            raise ConfigError(f"{len(idx)} pool indices but {len(new_labels)} labels.")
        texts, ys = self._data["train"]
        self._data["train"] = (texts + [self._pool_texts[i] for i in idx], ys + new_labels)
        self.datasets["train"] = TextDataset(*self._data["train"], self.tokenizer, self.max_length,
                                             transform=self.train_transform)
        return len(self._data["train"][0])

    def sample_inputs(self, n: int = 1) -> dict:
        """Model inputs of ``n`` real validation examples (cycling when the split is smaller)."""
        n = check_int("n", n, low=1)
        self.setup()
        ds = self.datasets["val"] if len(self.datasets["val"]) else self.datasets["test"]
        return ds.inputs([i % len(ds) for i in range(n)])

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        self.setup()
        ds = self.datasets[split]
        collate = IndexCollate(ds.collate) if split == "train" and self.return_index else ds.collate
        sampler = None
        if split == "train" and self.bucket_by_length:
            from .sampling import LengthBucketSampler, example_lengths

            # a DistributedSampler subclass: Lightning keeps it under DDP and calls set_epoch
            sampler, shuffle = LengthBucketSampler(example_lengths(ds), batch_size, seed=self.seed), False
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False)


def check_fractions(val_fraction, test_fraction) -> tuple[float, float]:
    """``data.val_fraction`` and ``data.test_fraction`` in ``[0, 1)`` with a non-empty remainder."""
    v = check_number("data.val_fraction", val_fraction, low=0.0, high=1.0, high_inclusive=False)
    t = check_number("data.test_fraction", test_fraction, low=0.0, high=1.0, high_inclusive=False)
    if v + t >= 1.0:
        raise ConfigError(
            f"data.val_fraction={v!r} + data.test_fraction={t!r} = {v + t:g} leaves no training data; keep the sum below 1."
        )
    return float(v), float(t)


def fraction_split(n: int, val_fraction: float, test_fraction: float, seed: int):
    """Seeded train/val/test split of ``range(n)`` by fractions (rounded, deterministic)."""
    return split_three(n, int(round(n * val_fraction)), int(round(n * test_fraction)), seed)
