"""MobileNet family from timm, adapted to small inputs, with the width multiplier as one knob.

The survey (§3.4.1) credits MobileNets' efficiency to depthwise-separable convolutions and a
*width multiplier* that thins every layer. timm builds the networks; we expose the multiplier
and replace the ImageNet stem (stride 2, then another stride-2 stage) by a stride-1 stem for
28×28 / 32×32 inputs, the usual CIFAR adaptation: without it a 32×32 image becomes 1×1 after
the fifth downsampling and accuracy collapses.

Example:
    >>> from lightning_eff.models import create_model
    >>> net = create_model("mobilenetv2", width=0.5, num_classes=10, in_chans=1)
    >>> net(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import timm
from timm.models import efficientnet as _timm_effnet
from timm.models import mobilenetv3 as _timm_mnv3
from torch import nn

from lightning_eff.models.registry import register_model
from lightning_eff.validation import check_int, check_number

__all__ = ["mobilenetv2", "mobilenetv3", "mobilenetv2_tiny", "adapt_stem_to_small_inputs"]


def adapt_stem_to_small_inputs(model: nn.Module, stages: int = 2) -> nn.Module:
    """Set the stride of the stem conv and of the first strided block(s) to 1, in place.

    Args:
        model: a timm EfficientNet/MobileNet (has ``conv_stem`` and ``blocks``).
        stages: how many stride-2 layers to undo, counting the stem (1 = stem only, 2 = stem and
            the first strided stage; total stride goes from 32 to 8 for ``stages=2``).
    """
    undone = 0
    convs = [model.conv_stem] + [m for blk in model.blocks for m in blk.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        if undone >= stages:
            break
        if conv.stride != (1, 1):
            conv.stride = (1, 1)
            undone += 1
    return model


def _check(width: float, num_classes: int, in_chans: int, small_input_stages: int) -> None:
    check_number("model.width", width, low=0.0, high=4.0, low_inclusive=False)
    check_int("model.num_classes", num_classes, low=2)
    check_int("model.in_chans", in_chans, low=1)
    check_int("model.small_input_stages", small_input_stages, low=0, high=3)


@register_model("mobilenetv2")
def mobilenetv2(
    width: float = 1.0,
    num_classes: int = 10,
    in_chans: int = 1,
    small_input_stages: int = 2,
    drop_rate: float = 0.0,
    depth: float = 1.0,
) -> nn.Module:
    """timm MobileNetV2 with width multiplier ``width`` (1.0 = ``mobilenetv2_100``).

    Args:
        width: channel (width) multiplier, the survey's depth multiplier trade-off knob.
        depth: block-repeat multiplier per stage (timm's ``depth_multiplier``; each stage keeps at least
            one block: 0.3 gives 8 of the 17 blocks).
        num_classes: classifier outputs.
        in_chans: input channels (1 for Fashion-MNIST, 3 for RGB).
        small_input_stages: stride-2 layers turned into stride 1 for small images (0 = ImageNet stem).
        drop_rate: dropout before the classifier.
    """
    _check(width, num_classes, in_chans, small_input_stages)
    check_number("model.depth", depth, low=0.0, high=4.0, low_inclusive=False)
    model = _timm_effnet._gen_mobilenet_v2(
        "mobilenetv2_100", channel_multiplier=width, depth_multiplier=depth, num_classes=num_classes, in_chans=in_chans,
        drop_rate=drop_rate,
    )
    return adapt_stem_to_small_inputs(model, small_input_stages)


@register_model("mobilenetv2_tiny")
def mobilenetv2_tiny(num_classes: int = 10, in_chans: int = 1, small_input_stages: int = 2, depth: float = 1.0) -> nn.Module:
    """A 0.25-width MobileNetV2 for tests (same structure, ~0.2M parameters; ``depth=0.3``: 8 blocks)."""
    return mobilenetv2(width=0.25, num_classes=num_classes, in_chans=in_chans, small_input_stages=small_input_stages, depth=depth)


@register_model("mobilenetv3")
def mobilenetv3(
    width: float = 1.0,
    num_classes: int = 10,
    in_chans: int = 1,
    small_input_stages: int = 2,
    drop_rate: float = 0.0,
    variant: str = "large",
) -> nn.Module:
    """timm MobileNetV3 (``large`` or ``small``) with width multiplier ``width``."""
    _check(width, num_classes, in_chans, small_input_stages)
    from lightning_eff.validation import check_choice

    check_choice("model.variant", variant, ["large", "small"])
    model = _timm_mnv3._gen_mobilenet_v3(
        f"mobilenetv3_{variant}_100", channel_multiplier=width, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate
    )
    return adapt_stem_to_small_inputs(model, small_input_stages)


@register_model("timm")
def timm_model(arch: str = "mobilenetv2_100", num_classes: int = 10, in_chans: int = 3, small_input_stages: int = 0) -> nn.Module:
    """Any timm architecture by name (random init: no weights are downloaded)."""
    from lightning_eff.errors import ConfigError, did_you_mean

    if arch not in timm.list_models():
        raise ConfigError(f"model.arch={arch!r} is not a timm model.{did_you_mean(arch, timm.list_models())}")
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if small_input_stages:
        adapt_stem_to_small_inputs(model, small_input_stages)
    return model
