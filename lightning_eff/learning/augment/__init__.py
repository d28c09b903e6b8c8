"""Data augmentation (survey §3.2.2): vision transforms and label mixing (:mod:`.vision`), text (:mod:`.text`).

Both are the ``data.train_transform`` option of the datamodules (training split only); label mixing is
``task.mixup`` of :class:`~lightning_eff.tasks.ClassificationTask`.
"""
from lightning_eff.learning.augment.text import (
    CharNoise,
    SwitchOut,
    SynonymReplace,
    TextAugment,
    WordDropout,
    WordSwap,
)
from lightning_eff.learning.augment.vision import (
    ImageAugment,
    make_mixup,
    mix_batch,
    soft_cross_entropy,
)

__all__ = ["CharNoise", "ImageAugment", "SwitchOut", "SynonymReplace", "TextAugment", "WordDropout", "WordSwap",
           "make_mixup", "mix_batch", "soft_cross_entropy"]
