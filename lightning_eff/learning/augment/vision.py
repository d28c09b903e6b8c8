"""Vision augmentation (survey §3.2.2): label-invariant transforms, RandAugment / AutoAugment /
TrivialAugment, random erasing, and label-mixing Mixup / CutMix with a soft-target loss.

The transforms are timm's and torchvision's well-kept implementations; this module only adapts them
to our data pipeline, which keeps images as ``uint8 [N,C,H,W]`` tensors and normalises whole batches:

- :class:`ImageAugment` is the ``data.train_transform`` of the image datamodules. Its ``ops`` run per
  training image on a PIL image (timm's RandAugment/AutoAugment take PIL images only; torchvision's
  transforms accept PIL too), grey ``"L"`` or ``"RGB"`` as stored; ``erasing`` (timm's
  ``RandomErasing``) runs on the normalised float batch, where timm defines it. Validation and test
  sets never get a transform (the datamodules build them without one).
- Fill colours follow the image: timm's ops default to an RGB mean that PIL refuses for grey images,
  so each op is built per image mode with a fill of the right arity (black by default: the zero
  padding the built-in crop uses and Fashion-MNIST's background).
- Randomness comes from Python's ``random`` and NumPy's global generator (timm: magnitudes, op choice)
  and torch's global generator (torchvision), all of which ``seed_everything(workers=True)`` seeds in the main process and in every dataloader worker: a run is
  reproducible under its seed, also with several workers, and workers do not repeat each other.
- Mixup/CutMix change the labels, so they live in the task (``ClassificationTask(mixup={...})``):
  :func:`mix_batch` wraps timm's ``Mixup`` (which needs an even batch: an odd last sample is kept
  unmixed, with its one-hot target) and :func:`soft_cross_entropy` is the loss. ``Distillation`` runs the
  teacher on the inputs the student saw, so a mixed batch is distilled as mixed.

Example:
    >>> import random; random.seed(0); _ = torch.manual_seed(0)
    >>> aug = ImageAugment(ops=[flip(), rand_augment(n=2, m=9)], erasing=random_erasing(p=0.5))
    >>> x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    >>> aug.images(x).shape, aug.images(x).dtype
    (torch.Size([4, 1, 28, 28]), torch.uint8)
    >>> xm, soft = mix_batch(make_mixup({"mixup_alpha": 0.2}, num_classes=10), torch.randn(5, 1, 28, 28),
    ...                      torch.tensor([0, 1, 2, 3, 4]))
    >>> soft.shape, bool(torch.allclose(soft.sum(1), torch.ones(5)))
    (torch.Size([5, 10]), True)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lightning_eff.data.transforms import ImageAugment, check_image_transform
from lightning_eff.errors import ConfigError
from lightning_eff.validation import as_list, check_int, check_number

__all__ = [
    "ImageAugment",
    "check_image_transform",
    "flip",
    "crop",
    "rotate",
    "shear",
    "translate",
    "scale",
    "resized_crop",
    "rand_augment",
    "auto_augment",
    "trivial_augment",
    "random_erasing",
    "make_mixup",
    "mix_batch",
    "soft_cross_entropy",
    "MIXUP_OPTIONS",
]

MIXUP_OPTIONS = ("mixup_alpha", "cutmix_alpha", "cutmix_minmax", "prob", "switch_prob", "mode", "label_smoothing",
                 "correct_lam")


def _fill(mode: str, fill: int | Sequence[int]) -> tuple[int, ...]:
    values = tuple(fill) if isinstance(fill, Sequence) else (int(fill),)
    channels = 1 if mode == "L" else 3
    return values[:1] if channels == 1 else (values * 3)[:3] if len(values) == 1 else values[:3]


class _PerMode:
    """A transform built on first use for each PIL image mode (and size), so fills and sizes fit the image.

    ``build(mode, size, **options)`` is a module-level function (picklable: dataloader workers and
    ``ddp_spawn`` pickle the datamodule that holds the transform).
    """

    def __init__(self, name: str, build: Callable[..., Callable], **options: Any) -> None:
        self.name, self._build, self.options, self._cache = name, build, options, {}

    def __call__(self, img):
        key = (img.mode, img.size)
        if key not in self._cache:
            self._cache[key] = self._build(img.mode, img.size, **self.options)
        return self._cache[key](img)

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}


def _v2():
    from torchvision.transforms import v2

    return v2


def flip(p: float = 0.5) -> Callable:
    """Horizontal flip with probability ``p`` (torchvision)."""
    check_number("flip.p", p, low=0.0, high=1.0)
    return _v2().RandomHorizontalFlip(p)


def _crop(mode, size, padding, fill):
    return _v2().RandomCrop((size[1], size[0]), padding=padding, fill=_fill(mode, fill))


def crop(padding: int = 4, fill: int = 0) -> Callable:
    """Random crop of the image's own size after ``padding`` pixels of ``fill`` on every side (torchvision)."""
    check_int("crop.padding", padding, low=1)
    return _PerMode("crop", _crop, padding=padding, fill=fill)


def _rotate(mode, size, degrees, fill):
    return _v2().RandomRotation(degrees, fill=_fill(mode, fill))


def rotate(degrees: float = 15.0, fill: int = 0) -> Callable:
    """Rotation by an angle uniform in ``[-degrees, degrees]`` (torchvision)."""
    check_number("rotate.degrees", degrees, low=0.0, high=180.0)
    return _PerMode("rotate", _rotate, degrees=degrees, fill=fill)


def _affine(mode, size, fill, **kwargs):
    return _v2().RandomAffine(0, fill=_fill(mode, fill), **kwargs)


def shear(degrees: float = 10.0, fill: int = 0) -> Callable:
    """Shear along x and y by up to ``degrees`` (torchvision ``RandomAffine``)."""
    check_number("shear.degrees", degrees, low=0.0, high=60.0)
    return _PerMode("shear", _affine, shear=(-degrees, degrees, -degrees, degrees), fill=fill)


def translate(fraction: float = 0.1, fill: int = 0) -> Callable:
    """Shift by up to ``fraction`` of the width/height (torchvision ``RandomAffine``)."""
    check_number("translate.fraction", fraction, low=0.0, high=0.5)
    return _PerMode("translate", _affine, translate=(fraction, fraction), fill=fill)


def scale(low: float = 0.8, high: float = 1.2, fill: int = 0) -> Callable:
    """Zoom by a factor uniform in ``[low, high]`` about the centre (torchvision ``RandomAffine``)."""
    check_number("scale.low", low, low=0.1, high=high)
    check_number("scale.high", high, low=low, high=4.0)
    return _PerMode("scale", _affine, scale=(low, high), fill=fill)


def _resized_crop(mode, size, scale_range, ratio):
    from timm.data.transforms import RandomResizedCropAndInterpolation

    return RandomResizedCropAndInterpolation((size[1], size[0]), scale=scale_range, ratio=ratio)


def resized_crop(scale_range: Sequence[float] = (0.35, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Callable:
    """Inception-style random-resized crop back to the image's size (timm ``RandomResizedCropAndInterpolation``)."""
    lo, hi = (float(v) for v in as_list("resized_crop.scale_range", scale_range, item=(int, float)))
    check_number("resized_crop.scale_range[0]", lo, low=0.01, high=hi)
    check_number("resized_crop.scale_range[1]", hi, low=lo, high=1.0)
    r_lo, r_hi = (float(v) for v in as_list("resized_crop.ratio", ratio, item=(int, float)))
    check_number("resized_crop.ratio[0]", r_lo, low=0.05, high=r_hi, low_inclusive=False)
    check_number("resized_crop.ratio[1]", r_hi, low=r_lo, high=20.0)
    return _PerMode("resized_crop", _resized_crop, scale_range=(lo, hi), ratio=(r_lo, r_hi))


def _posterize_at_least_1_bit(img, bits_to_keep, **_):
    from PIL import ImageOps

    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, int(bits_to_keep)))


def _timm_auto_augment():
    """timm's auto_augment module, its posterize op made to keep at least 1 bit.

    timm 1.0 maps low magnitudes to 0 bits (RandAugment at magnitudes below 2.5, AutoAugment's v0
    policy, the ``inc1`` variant at 10); Pillow >= 11 refuses 0 bits (``ValueError: bits must be between
    or equal to 1 and 8``) where older Pillow returned a black image. 1 bit is the nearest valid op.
    """
    from timm.data import auto_augment as aa

    if aa.NAME_TO_OP.get("Posterize") is aa.posterize:
        for name, fn in list(aa.NAME_TO_OP.items()):
            if fn is aa.posterize:
                aa.NAME_TO_OP[name] = _posterize_at_least_1_bit
    return aa


def _rand_augment(mode, size, config, fill):
    hparams = {"img_mean": _fill(mode, fill), "translate_const": int(size[0] * 0.45)}
    return _timm_auto_augment().rand_augment_transform(config, hparams)


def rand_augment(n: int = 2, m: int = 9, mstd: float = 0.5, increasing: bool = False, fill: int = 0) -> Callable:
    """RandAugment (Cubuk et al., 2020): ``n`` random ops of magnitude ``m`` (0-10) with noise ``mstd`` (timm).

    ``increasing`` uses timm's variants whose strength grows with the magnitude (``-inc1``).
    """
    check_int("rand_augment.n", n, low=1, high=8)
    check_int("rand_augment.m", m, low=0, high=10)
    check_number("rand_augment.mstd", mstd, low=0.0)
    config = f"rand-m{m}-n{n}-mstd{mstd}" + ("-inc1" if increasing else "")
    return _PerMode("rand_augment", _rand_augment, config=config, fill=fill)


AUTO_AUGMENT_POLICIES = ("original", "originalr", "v0", "v0r", "3a")


def _auto_augment(mode, size, policy, fill):
    return _timm_auto_augment().auto_augment_transform(policy, {"img_mean": _fill(mode, fill), "translate_const": int(size[0] * 0.45)})


def auto_augment(policy: str = "v0", fill: int = 0) -> Callable:
    """AutoAugment (Cubuk et al., 2019) with one of timm's ImageNet policies."""
    if policy not in AUTO_AUGMENT_POLICIES:
        raise ConfigError(f"auto_augment.policy={policy!r} is not supported; choose from {list(AUTO_AUGMENT_POLICIES)}.")
    return _PerMode("auto_augment", _auto_augment, policy=policy, fill=fill)


def _trivial(mode, size, fill):
    return _v2().TrivialAugmentWide(fill=list(_fill(mode, fill)))


def trivial_augment(fill: int = 0) -> Callable:
    """TrivialAugment (Müller & Hutter, 2021): one op, uniform magnitude. timm has no TrivialAugment;
    torchvision's ``TrivialAugmentWide`` is used."""
    return _PerMode("trivial_augment", _trivial, fill=fill)


def random_erasing(p: float = 0.25, mode: str = "pixel", max_area: float = 1 / 3, count: int = 1) -> Callable:
    """Random erasing (Zhong et al., 2020) on the normalised batch (timm ``RandomErasing``; per sample)."""
    check_number("random_erasing.p", p, low=0.0, high=1.0)
    check_number("random_erasing.max_area", max_area, low=0.02, high=1.0)
    check_int("random_erasing.count", count, low=1)
    if mode not in ("const", "rand", "pixel"):
        raise ConfigError(f"random_erasing.mode={mode!r} is not supported; choose from ['const', 'rand', 'pixel'].")
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=p, mode=mode, max_area=max_area, max_count=count, device="cpu")


# --------------------------------------------------------------------------------------------
# label mixing
# --------------------------------------------------------------------------------------------
def make_mixup(options: Mapping[str, Any] | Any, num_classes: int, option: str = "task.mixup"):
    """timm's ``Mixup`` from ``{mixup_alpha, cutmix_alpha, prob, switch_prob, mode, label_smoothing, ...}``.

    ``None`` or ``{}`` gives ``None`` (no mixing); a ``Mixup`` object is returned as given. Unlike timm's
    default (0.1), ``label_smoothing`` is 0 unless given (``ClassificationTask`` passes its own).

    Raises:
        ConfigError: an unknown key (the valid ones named), or both alphas zero.
    """
    if options is None:
        return None
    from timm.data import Mixup

    if isinstance(options, Mixup):
        return options
    if not isinstance(options, Mapping):
        raise ConfigError(f"{option}={options!r} must be a mapping of {list(MIXUP_OPTIONS)} or null.")
    if not options:
        return None
    for key in options:
        if key not in MIXUP_OPTIONS:
            from lightning_eff.errors import did_you_mean

            raise ConfigError(f"unknown key {option}.{key}; valid keys: {list(MIXUP_OPTIONS)}.{did_you_mean(key, MIXUP_OPTIONS)}")
    opts = dict(options)
    opts.setdefault("mixup_alpha", 0.0)
    opts.setdefault("cutmix_alpha", 0.0)
    opts.setdefault("label_smoothing", 0.0)  # timm's default is 0.1: smoothing only when asked for
    for key in ("mixup_alpha", "cutmix_alpha"):
        check_number(f"{option}.{key}", opts[key], low=0.0)
    for key in ("prob", "switch_prob", "label_smoothing"):
        if key in opts:
            check_number(f"{option}.{key}", opts[key], low=0.0, high=1.0)
    if opts.get("mode", "batch") not in ("batch", "pair", "elem"):
        raise ConfigError(f"{option}.mode={opts['mode']!r} is not supported; choose from ['batch', 'pair', 'elem'].")
    if opts["mixup_alpha"] <= 0 and opts["cutmix_alpha"] <= 0 and not opts.get("cutmix_minmax"):
        raise ConfigError(f"{option}: mixup_alpha and cutmix_alpha are both 0, nothing would be mixed; set one above 0 "
                          f"or {option}=null.")
    return Mixup(num_classes=num_classes, **opts)


def mix_batch(mixup: Any, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mixed inputs, soft targets [B, num_classes])`` from timm's ``Mixup``; targets sum to 1 per row.

    timm mixes a batch with its flipped self and needs an even size: with an odd batch the last sample
    stays unmixed (its one-hot target, smoothed like the others), so ``drop_last`` is not required.
    """
    n = x.shape[0]
    even = n - n % 2
    if even == 0:
        soft = _smoothed_one_hot(labels, mixup.num_classes, mixup.label_smoothing, x.dtype)
        return x, soft
    xm, ym = mixup(x[:even].clone(), labels[:even])
    if even == n:
        return xm, ym.to(x.dtype)
    tail = _smoothed_one_hot(labels[even:], mixup.num_classes, mixup.label_smoothing, ym.dtype)
    return torch.cat([xm, x[even:]]), torch.cat([ym, tail]).to(x.dtype)


def _smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float, dtype) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, dtype=dtype, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1.0 - smoothing + off)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution per row: ``mean(-Σ target · log_softmax(logits))``."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
