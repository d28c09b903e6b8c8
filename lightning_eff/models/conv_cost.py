"""Cost of depthwise-separable vs standard convolutions: hand formulas and measurements.

MobileNets (Howard et al., 2017; survey §3.4.1) factor a standard ``k x k`` convolution from
``C_in`` to ``C_out`` channels into a depthwise ``k x k`` convolution (one filter per input
channel) and a pointwise ``1 x 1`` convolution. With output size ``H x W``:

    standard:  params = k² C_in C_out            MACs = k² C_in C_out H W
    separable: params = k² C_in + C_in C_out     MACs = (k² C_in + C_in C_out) H W
    separable / standard = 1/C_out + 1/k²        (≈ 1/8 to 1/9 for k = 3: the survey's 7-10x)

(bias-free convolutions, as in MobileNets where BatchNorm follows every conv). The functions
below give both the formula and the figures measured on real ``nn.Conv2d`` modules with
:func:`~lightning_eff.measure.counts.count_parameters` / ``count_macs``, for one layer and for
whole models (MobileNetV2 vs the same network with standard convolutions, ``"plain_cnn"``).

Example:
    >>> r = layer_ratios(64, 128, kernel=3, size=16)
    >>> round(r["formula_param_ratio"], 4), r["measured_param_ratio"] == r["formula_param_ratio"]
    (0.1189, True)
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_eff.models.registry import register_model
from lightning_eff.validation import check_bool, check_int, check_number

__all__ = ["standard_conv_cost", "separable_conv_cost", "layer_ratios", "replace_depthwise_with_standard", "model_ratios", "plain_cnn"]


def _out_size(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1  # "same" padding k//2


def standard_conv_cost(c_in: int, c_out: int, kernel: int = 3, size: int = 1, stride: int = 1) -> dict[str, int]:
    """Parameters and MACs of a bias-free ``kernel x kernel`` conv on a ``size x size`` input."""
    hw = _out_size(size, kernel, stride) ** 2
    params = kernel * kernel * c_in * c_out
    return {"params": params, "macs": params * hw}


def separable_conv_cost(c_in: int, c_out: int, kernel: int = 3, size: int = 1, stride: int = 1) -> dict[str, int]:
    """Parameters and MACs of depthwise ``kernel x kernel`` + pointwise ``1 x 1`` (bias-free)."""
    hw = _out_size(size, kernel, stride) ** 2
    params = kernel * kernel * c_in + c_in * c_out
    return {"params": params, "macs": params * hw}


def layer_ratios(c_in: int, c_out: int, kernel: int = 3, size: int = 16, stride: int = 1) -> dict[str, Any]:
    """Separable/standard ratios of one layer: by formula and measured on real modules.

    Raises:
        ConfigError: a non-positive channel count, kernel, size or stride.
    """
    from lightning_eff.measure import count_macs, count_parameters

    for name, value in (("c_in", c_in), ("c_out", c_out), ("kernel", kernel), ("size", size), ("stride", stride)):
        check_int(name, value, low=1)
    std, sep = standard_conv_cost(c_in, c_out, kernel, size, stride), separable_conv_cost(c_in, c_out, kernel, size, stride)
    pad = kernel // 2
    standard = nn.Conv2d(c_in, c_out, kernel, stride, pad, bias=False)
    separable = nn.Sequential(nn.Conv2d(c_in, c_in, kernel, stride, pad, groups=c_in, bias=False),
                              nn.Conv2d(c_in, c_out, 1, bias=False))
    x = torch.zeros(1, c_in, size, size)
    measured = {
        "standard": {"params": count_parameters(standard), "macs": count_macs(standard, x)},
        "separable": {"params": count_parameters(separable), "macs": count_macs(separable, x)},
    }
    return {
        "shape": {"c_in": c_in, "c_out": c_out, "kernel": kernel, "size": size, "stride": stride},
        "formula": {"standard": std, "separable": sep},
        "measured": measured,
        "formula_param_ratio": sep["params"] / std["params"],
        "formula_mac_ratio": sep["macs"] / std["macs"],
        "closed_form_ratio": 1.0 / c_out + 1.0 / kernel**2,
        "measured_param_ratio": measured["separable"]["params"] / measured["standard"]["params"],
        "measured_mac_ratio": measured["separable"]["macs"] / measured["standard"]["macs"],
    }


def replace_depthwise_with_standard(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Swap every depthwise conv (``groups == in_channels == out_channels > 1``) for a standard conv of equal shape.

    Stride, padding, dilation and kernel are kept, so the network's depth, widths and feature
    map sizes do not change: only the depthwise saving is removed.
    """
    model = model if inplace else copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            standard = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                 module.padding, module.dilation, groups=1, bias=module.bias is not None,
                                 padding_mode=module.padding_mode)
            setattr(parent, name.rpartition(".")[2], standard)
    return model


def model_ratios(width: float = 0.5, input_size: int = 32, num_classes: int = 10, in_chans: int = 1,
                 small_input_stages: int = 1) -> dict[str, Any]:
    """Parameters and MACs of MobileNetV2 vs ``plain_cnn`` (standard convs), same width and input.

    Raises:
        ConfigError: an option out of range.
    """
    from lightning_eff.measure import count_macs, count_parameters

    check_number("width", width, low=0.0, low_inclusive=False, high=4.0)
    check_int("input_size", input_size, low=8)
    kwargs = dict(width=width, num_classes=num_classes, in_chans=in_chans, small_input_stages=small_input_stages)
    x = torch.zeros(1, in_chans, input_size, input_size)
    rows = {}
    for name, standard in (("mobilenetv2", False), ("plain_cnn", True)):
        net = plain_cnn(**kwargs, standard_convs=standard).eval()
        rows[name] = {"params": count_parameters(net), "macs": count_macs(net, x)}
    return {
        "width": width, "input_size": input_size, "rows": rows,
        "param_ratio": rows["mobilenetv2"]["params"] / rows["plain_cnn"]["params"],
        "mac_ratio": rows["mobilenetv2"]["macs"] / rows["plain_cnn"]["macs"],
    }


@register_model("plain_cnn")
def plain_cnn(width: float = 0.5, num_classes: int = 10, in_chans: int = 1, small_input_stages: int = 1,
              drop_rate: float = 0.0, standard_convs: bool = True) -> nn.Module:
    """MobileNetV2 (same stages, widths, strides, depth) with standard instead of depthwise 3x3 convs.

    Args:
        width, num_classes, in_chans, small_input_stages, drop_rate: as for ``"mobilenetv2"``.
        standard_convs: replace the depthwise convolutions (False gives MobileNetV2 itself).
    """
    from lightning_eff.models.mobilenet import mobilenetv2

    check_bool("model.standard_convs", standard_convs)
    model = mobilenetv2(width=width, num_classes=num_classes, in_chans=in_chans,
                        small_input_stages=small_input_stages, drop_rate=drop_rate)
    return replace_depthwise_with_standard(model) if standard_convs else model

