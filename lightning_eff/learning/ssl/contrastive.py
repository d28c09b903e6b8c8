"""Self-supervised pretraining pieces (survey §3.2.3): SimCLR's views, projection head and NT-Xent loss,
rotation prediction, and the embedding / kNN probe that monitors them. Plain PyTorch, no Lightning.

Why written here rather than taken from lightly: lightly 1.6 installs beside our pins, but its
transforms are per-sample PIL pipelines (on 2 cores the two views of a 256-image batch would cost more
than the training step) and NT-Xent is a dozen lines, tested in ``tests/test_ssl.py`` against a
hand-written per-anchor loop. The views below are batched tensor ops on the already-normalised batch
(works on CPU and GPU, 1 or 3 channels, any size).

- :class:`SimCLRViews` (Chen et al., 2020, arXiv:2002.05709): random-resized crop + horizontal flip as
  one ``affine_grid``/``grid_sample`` per batch, brightness/contrast (+ saturation, greyscale for RGB)
  jitter, optional Gaussian blur. Brightness is shifted in units of the data's standard deviation (the
  batch is already normalised). Randomness: torch's global generator (``seed_everything`` seeds it).
- :func:`nt_xent`: the normalised-temperature cross-entropy over the ``2B`` views.
- :func:`rotate_batch` (Gidaris et al., 2018): each image at 0/90/180/270 degrees with its rotation label.
- :func:`embed`: a network's penultimate features (timm's ``forward_head(pre_logits=True)``, else the input
  of the last ``nn.Linear``); :func:`knn_predict`: the weighted kNN vote of Wu et al. (2018).

Example:
    >>> _ = torch.manual_seed(0)
    >>> views = SimCLRViews()
    >>> x = torch.randn(8, 1, 28, 28)
    >>> v1, v2 = views(x), views(x)
    >>> v1.shape, bool((v1 - v2).abs().mean() > 0.1)
    (torch.Size([8, 1, 28, 28]), True)
    >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    >>> round(float(nt_xent(z1, z1, temperature=0.5)), 3) < round(float(nt_xent(z1, z2, temperature=0.5)), 3)
    True
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_eff.batch import call_model
from lightning_eff.errors import ConfigError
from lightning_eff.validation import as_list, check_int, check_number

__all__ = ["SimCLRViews", "nt_xent", "projection_head", "rotate_batch", "embed", "embedding_dim", "knn_predict"]


class SimCLRViews:
    """A random view of a normalised image batch ``[B,C,H,W]`` per call (same shape, same device).

    Args:
        crop_scale: area range of the random-resized crop (SimCLR: 0.08-1 on ImageNet; 0.2-1 for 32 px).
        flip: probability of a horizontal flip.
        jitter: probability of colour jitter; ``brightness`` (a shift in data std units), ``contrast``,
            ``saturation`` (RGB only) its strengths.
        grayscale: probability of turning an RGB view grey.
        blur: probability of a Gaussian blur (kernel ~10% of the side, sigma 0.1-2 px).
    """

    def __init__(self, crop_scale: Sequence[float] = (0.2, 1.0), flip: float = 0.5, jitter: float = 0.8,
                 brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, grayscale: float = 0.2,
                 blur: float = 0.0) -> None:
        lo, hi = (float(v) for v in as_list("views.crop_scale", crop_scale, item=(int, float)))
        check_number("views.crop_scale[0]", lo, low=0.01, high=hi)
        check_number("views.crop_scale[1]", hi, low=lo, high=1.0)
        for name, value in (("flip", flip), ("jitter", jitter), ("grayscale", grayscale), ("blur", blur),
                            ("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            check_number(f"views.{name}", value, low=0.0, high=1.0)
        self.crop_scale, self.flip, self.jitter = (lo, hi), flip, jitter
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.grayscale, self.blur = grayscale, blur

    def __repr__(self) -> str:
        return (f"SimCLRViews(crop_scale={self.crop_scale}, flip={self.flip}, jitter={self.jitter}, "
                f"grayscale={self.grayscale}, blur={self.blur})")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ConfigError(f"SimCLR views need image batches [B,C,H,W]; got a {x.ndim}-D tensor.")
        x = self._crop_flip(x.float())
        b, c = x.shape[:2]
        dev = x.device
        rand = lambda *shape: torch.rand(*shape, device=dev)  # noqa: E731
        on = (rand(b, 1, 1, 1) < self.jitter).float()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1 + (rand(b, 1, 1, 1) * 2 - 1) * self.contrast
        x = torch.lerp(x, (x - mean) * contrast + mean, on)
        x = x + on * (rand(b, 1, 1, 1) * 2 - 1) * self.brightness
        if c == 3:
            grey = x.mean(dim=1, keepdim=True).expand_as(x)
            sat = 1 + (rand(b, 1, 1, 1) * 2 - 1) * self.saturation
            x = torch.lerp(x, grey + (x - grey) * sat, on)
            to_grey = (rand(b, 1, 1, 1) < self.grayscale).float()
            x = torch.lerp(x, x.mean(dim=1, keepdim=True).expand_as(x), to_grey)
        if self.blur > 0:
            x = self._blur(x, rand(b) < self.blur)
        return x

    def _crop_flip(self, x: torch.Tensor) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        lo, hi = self.crop_scale
        area = torch.empty(b, device=dev).uniform_(lo, hi)
        log_ratio = torch.empty(b, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3))
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)  # fraction of the width the crop covers
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
        cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
        sign = torch.where(torch.rand(b, device=dev) < self.flip, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = w * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    @staticmethod
    def _blur(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        if not bool(which.any()):
            return x
        b, c, h, _ = x.shape
        k = max(3, int(0.1 * h) | 1)
        sigma = torch.empty(b, device=x.device).uniform_(0.1, 2.0)
        r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
        kern = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
        kern = kern / kern.sum(1, keepdim=True)  # [B, k], one separable kernel per image
        weight = kern.repeat_interleave(c, 0)  # per (image, channel) group
        y = x.reshape(1, b * c, h, -1)
        y = F.conv2d(F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect"), weight[:, None, None, :], groups=b * c)
        y = F.conv2d(F.pad(y, (0, 0, k // 2, k // 2), mode="reflect"), weight[:, None, :, None], groups=b * c)
        y = y.reshape_as(x)
        return torch.where(which[:, None, None, None], y, x)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over the ``2B`` projections: each view's positive is the other view of its image, the
    other ``2B - 2`` views are negatives; cosine similarity divided by ``temperature``; mean over anchors."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ConfigError(f"nt_xent needs two [B, D] projections of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, targets)


def projection_head(in_dim: int, hidden_dim: int | None = None, out_dim: int = 128) -> nn.Sequential:
    """SimCLR's projection g: ``Linear -> ReLU -> Linear`` (the loss is on g's output, the backbone is kept)."""
    check_int("task.projection_dim", out_dim, low=2)
    hidden = check_int("task.hidden_dim", hidden_dim, low=2, allow_none=True) or in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B,C,H,W]`` -> every image at 0, 90, 180, 270 degrees ``[4B,C,H,W]`` and the rotation labels ``[4B]``."""
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ConfigError(f"rotation prediction needs square image batches [B,C,H,H]; got shape {tuple(x.shape)}.")
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return rotated, labels


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def embed(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The penultimate features ``[B, D]`` of ``model`` (what a kNN probe and a projection head read).

    timm models: ``forward_head(forward_features(x), pre_logits=True)``. Any other model: the input of its
    last ``nn.Linear`` (the classifier), caught by a forward pre-hook during a normal forward.

    Raises:
        ConfigError: the model has neither a timm head nor an ``nn.Linear``.
    """
    if hasattr(model, "forward_features") and hasattr(model, "forward_head") and isinstance(inputs, torch.Tensor):
        return model.forward_head(model.forward_features(inputs), pre_logits=True).flatten(1)
    head = _last_linear(model)
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no timm forward_head and no nn.Linear classifier: its features "
                          "cannot be found for a projection head or a kNN probe.")
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        call_model(model, inputs)
    finally:
        handle.remove()
    return seen[-1].flatten(1)


def embedding_dim(model: nn.Module, example: Any) -> int:
    """The width of :func:`embed`: timm's pre-logits width (``head_hidden_size`` where the head has a hidden
    layer, as MobileNetV3's 1280 after 960 features; else ``num_features``), else the classifier's ``in_features``."""
    if hasattr(model, "forward_head") and hasattr(model, "num_features"):
        return int(getattr(model, "head_hidden_size", None) or model.num_features)
    head = _last_linear(model)
    if head is not None:
        return int(head.in_features)
    with torch.no_grad():
        return int(embed(model, example).shape[1])


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.1) -> torch.Tensor:
    """Class predictions ``[Q]`` of a weighted kNN on cosine similarity (Wu et al., 2018, arXiv:1805.01978):
    the ``k`` nearest bank features vote for their label with weight ``exp(similarity / temperature)``."""
    check_int("knn.k", k, low=1)
    q = F.normalize(query.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    sim = q @ b.t()
    k = min(k, b.shape[0])
    top, idx = sim.topk(k, dim=1)
    weights = (top / temperature).exp()
    votes = torch.zeros(q.shape[0], num_classes, device=q.device)
    votes.scatter_add_(1, bank_labels.to(q.device)[idx], weights)
    return votes.argmax(dim=1)
