"""Datamodules for the real offline datasets and users' own data.

Image modules yield ``(images float32 [B,C,H,W], labels int64 [B])``; text modules yield dicts
with ``"labels"`` plus ``"text"`` (``tokenizer="raw"``) or ``"input_ids"``/``"attention_mask"``.
All expose ``num_classes``, ``class_names`` and ``sample_inputs(n)`` after ``setup()``.
"""
from .fashion_mnist import FashionMNISTDataModule
from .generic import CIFAR10DataModule, ImageFolderDataModule, TextFileDataModule
from .indexed import IndexedBatch, IndexedCollate, IndexedDataset
from .sampling import LengthBucketSampler
from .tokenizers import train_wordpiece_vocab, wordpiece_tokenizer
from .wordnet import LEXNAMES, WordNetSupersenseDataModule

__all__ = [
    "FashionMNISTDataModule",
    "IndexedBatch",
    "IndexedCollate",
    "IndexedDataset",
    "LengthBucketSampler",
    "WordNetSupersenseDataModule",
    "ImageFolderDataModule",
    "CIFAR10DataModule",
    "TextFileDataModule",
    "LEXNAMES",
    "train_wordpiece_vocab",
    "wordpiece_tokenizer",
]
