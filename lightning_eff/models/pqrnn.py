"""pQRNN: ternary hash projection -> bottleneck -> bidirectional QRNN -> pooling -> classifier.

pQRNN (Kaliamoorthi, Siddhant, Li & Johnson, "Distilling Large Language Models into Tiny and
Effective Students using pQRNN", arXiv:2101.08890, 2021; survey §3.4.2) keeps no embedding table:
a parameter-free projection (:class:`~lightning_eff.models.projection.TernaryProjection`) gives
each token ternary features, a dense *bottleneck* maps them to ``d`` dimensions, and a stack of
bidirectional quasi-recurrent layers (QRNN, Bradbury, Merity, Xiong & Socher, ICLR 2017) mixes
context:

    Z = tanh(W_z * X),  F = sigmoid(W_f * X),  O = sigmoid(W_o * X)   (* = causal conv, width k)
    c_t = f_t ⊙ c_{t-1} + (1 - f_t) ⊙ z_t,   h_t = o_t ⊙ c_t          (fo-pooling)

All heavy work is in the gate convolutions, which run in parallel over time; the recurrence is
only element-wise. Zoneout (Krueger et al., ICLR 2017) regularises training by forcing a random
subset of forget gates to 1 (the cell keeps its previous value): ``F = 1 - dropout(1 - F)``.

Why the convolutions are ``nn.Linear`` over concatenated windows: PyTorch's dynamic int8
quantization (:func:`~lightning_eff.compression.quantization.fx.dynamic_quantize`) covers
``Linear``/``LSTM``/``GRU`` only, so expressing the width-``k`` convolution as a Linear on the
``k`` stacked neighbours makes *every* weight of the tensor path int8-quantizable.

Quantization: the masked, data-dependent steps (:func:`zero_padding`, :func:`qrnn_recurrence`,
:func:`masked_pool`) are ``torch.fx.wrap``-ped, so FX graph-mode quantization (static PTQ and
QAT, :mod:`~lightning_eff.compression.quantization.fx`) traces ``model.encoder`` with them as
opaque float calls: every Linear (bottleneck, gates, classifier) runs int8; the gate
activations and the element-wise recurrence stay float. Zoneout draws its mask through an
``nn.Dropout`` *module*, whose train/eval switch is read at run time; a ``self.training`` test in
``forward`` would be frozen into the traced graph (QAT traces in training mode, so the int8 model
would keep zoning out at inference).

Export: ``model.encoder`` (== :meth:`PQRNN.forward_features`) is tensor-only and scripts with
``torch.jit.script`` (the fo-pooling loop stays a loop, so any length works; tracing would
unroll it for one length, so use ``method="script"``).
The string hashing stays in Python pre-processing (see :mod:`~lightning_eff.models.projection`).

Example:
    >>> from lightning_eff.models import create_model
    >>> net = create_model("pqrnn_tiny", num_classes=26)
    >>> net(["a hand tool for driving nails", "a small rodent"]).shape
    torch.Size([2, 26])
"""
# No ``from __future__ import annotations``: FX copies the encoder's annotations into the code of
# traced / int8 graphs, and a string annotation becomes ``_Tensor_``, which TorchScript rejects.

import torch
from torch import Tensor, nn

from lightning_eff.models.projection import TernaryProjection
from lightning_eff.models.registry import register_model
from lightning_eff.validation import check_choice, check_int, check_number

__all__ = ["fo_pool", "qrnn_recurrence", "zero_padding", "causal_windows", "QRNNDirection", "QRNNLayer",
           "PQRNNEncoder", "PQRNN", "ProjectionModel", "masked_pool", "POOLINGS"]

POOLINGS = ["mean", "max", "mean_max"]


def fo_pool(z: Tensor, f: Tensor, o: Tensor) -> Tensor:
    """fo-pooling over time (dim 1) from a zero cell: ``c_t = f c_{t-1} + (1-f) z_t``, ``h_t = o c_t``.

    Written in the TorchScript subset so ``torch.jit.script`` keeps the time loop. Export with
    ``method="script"``: ``torch.jit.trace`` would unroll the loop for the example's length.
    (Not decorated with ``@torch.jit.script`` at import: that emits a FutureWarning on every
    ``import lightning_eff.models``.)
    """
    c = torch.zeros_like(z[:, 0])
    outputs = []
    for t in range(z.size(1)):
        c = f[:, t] * c + (1.0 - f[:, t]) * z[:, t]
        outputs.append(o[:, t] * c)
    return torch.stack(outputs, dim=1)


def qrnn_recurrence(gates: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
    """Gate activations and fo-pooling of one QRNN direction: ``gates`` ``[B, L, 3h]`` -> ``[B, L, h]``.

    Forget gates are forced to 1 where ``keep`` ``[B, L, h]`` is 0 (zoneout) and at padding
    (``mask`` ``[B, L]`` False), so the cell carries its value through them unchanged.
    """
    z, f, o = gates.chunk(3, dim=-1)
    z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
    f = torch.where((keep > 0) & mask.unsqueeze(-1), f, torch.ones_like(f))
    return fo_pool(z, f, o)


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` ``[B, L, d]`` with the rows where ``mask`` ``[B, L]`` is False set to 0."""
    return x * mask.unsqueeze(-1).to(x.dtype)


# FX sees these as single opaque calls: they stay float in an int8 graph, which keeps the bool
# mask away from the observers (a bool input cannot be observed) and the gate activations and
# the recurrence in float (measured on a WordNet-trained pqrnn_tiny: int8 sigmoid/tanh with
# their fixed 1/256 output grid drop the logits' SQNR from 34 dB to 8 dB: errors in f compound
# over the time steps).
torch.fx.wrap("qrnn_recurrence")
torch.fx.wrap("zero_padding")


def causal_windows(x: Tensor, width: int) -> Tensor:
    """``[B, L, d] -> [B, L, width*d]``: row t holds ``x[t-width+1], ..., x[t]`` (zeros before the start)."""
    if width == 1:
        return x
    padded = torch.nn.functional.pad(x, (0, 0, width - 1, 0))
    length = x.size(1)
    return torch.cat([padded[:, i : i + length] for i in range(width)], dim=-1)


def masked_pool(x: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """Mean, max or both (concatenated) over the valid positions of ``x`` ``[B, L, d]``; empty rows give 0."""
    m = mask.unsqueeze(-1).to(x.dtype)
    parts: list[Tensor] = []
    if pooling == "mean" or pooling == "mean_max":
        parts.append((x * m).sum(1) / m.sum(1).clamp_min(1.0))
    if pooling == "max" or pooling == "mean_max":
        filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        parts.append(torch.where(torch.isfinite(filled), filled, torch.zeros_like(filled)))
    return torch.cat(parts, dim=-1)


torch.fx.wrap("masked_pool")


class QRNNDirection(nn.Module):
    """One direction of a QRNN layer: gates from a width-``kernel`` causal conv, then fo-pooling.

    Padding positions (``mask`` False) get ``f = 1`` so the cell carries its value through them
    unchanged; for the reversed direction this keeps the leading padding from leaking in.
    Zoneout: ``zone`` (an ``nn.Dropout``) zeroes each entry of a ones tensor with probability
    ``zoneout`` in training and is the identity in eval; zeroed entries get ``f = 1``.
    """

    def __init__(self, in_features: int, hidden: int, kernel: int, zoneout: float) -> None:
        super().__init__()
        self.kernel, self.hidden, self.zoneout = kernel, hidden, zoneout
        self.gates = nn.Linear(kernel * in_features, 3 * hidden)
        self.zone = nn.Dropout(zoneout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        gates = self.gates(causal_windows(x, self.kernel))
        # a module, so train/eval is decided at run time, also in FX graphs
        keep = self.zone(torch.ones((mask.size(0), mask.size(1), self.hidden), dtype=gates.dtype, device=gates.device))
        return qrnn_recurrence(gates, mask, keep)


class QRNNLayer(nn.Module):
    """Bidirectional QRNN layer: ``[B, L, d] -> [B, L, 2*hidden]`` (forward ‖ backward)."""

    def __init__(self, in_features: int, hidden: int, kernel: int = 2, zoneout: float = 0.0) -> None:
        super().__init__()
        self.fwd = QRNNDirection(in_features, hidden, kernel, zoneout)
        self.bwd = QRNNDirection(in_features, hidden, kernel, zoneout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        x = zero_padding(x, mask)  # padding must read as zeros in the conv windows
        forward = self.fwd(x, mask)
        backward = self.bwd(x.flip(1), mask.flip(1)).flip(1)
        return torch.cat([forward, backward], dim=-1)


class PQRNNEncoder(nn.Module):
    """The tensor-only part of pQRNN: ``(features [B,L,F], mask [B,L]) -> logits [B, C]``."""

    def __init__(self, in_features: int, num_classes: int, bottleneck: int, hidden: int, num_layers: int,
                 kernel: int, zoneout: float, dropout: float, pooling: str) -> None:
        super().__init__()
        self.pooling = pooling
        self.bottleneck = nn.Linear(in_features, bottleneck)
        self.layers = nn.ModuleList(
            [QRNNLayer(bottleneck if i == 0 else 2 * hidden, hidden, kernel, zoneout) for i in range(num_layers)]
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(2 * hidden * (2 if pooling == "mean_max" else 1), num_classes)

    def forward(self, features: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        x = torch.relu(self.bottleneck(features))
        for layer in self.layers:
            x = self.dropout(layer(x, mask))
        return self.classifier(masked_pool(x, mask, self.pooling))


class ProjectionModel(nn.Module):
    """Base of the projection models: ``forward(text)`` = ``encoder(*projection(text))``.

    ``projection`` (no parameters) runs in Python; ``encoder`` holds every weight and takes
    tensors only, so it is what gets quantized and exported (:meth:`forward_features`).
    """

    projection: TernaryProjection
    encoder: nn.Module

    def forward(self, text: list[str]) -> Tensor:
        """Logits ``[B, num_classes]`` for a batch of raw strings."""
        features, mask = self.projection(text)
        # A dynamically quantized encoder has no float parameters left; it runs on the CPU.
        param = next(iter(self.encoder.parameters()), None)
        device = param.device if param is not None else features.device
        return self.encoder(features.to(device), mask.to(device))

    def forward_features(self, features: Tensor, mask: Tensor) -> Tensor:
        """The tensor-only path: projection features ``[B, L, F]`` and mask ``[B, L]`` -> logits."""
        return self.encoder(features, mask)


class PQRNN(ProjectionModel):
    """pQRNN text classifier on raw text (see the module docstring).

    Args:
        num_classes: classifier outputs.
        num_hashes, hash_bits, seed, char_ngrams, max_tokens: projection options
            (:class:`~lightning_eff.models.projection.TernaryProjection`).
        bottleneck: width ``d`` of the dense layer after the projection.
        hidden: QRNN state size per direction.
        num_layers: stacked bidirectional QRNN layers.
        kernel: width ``k`` of the gate convolutions (2 = the current and the previous token).
        zoneout: probability of forcing a forget gate to 1 during training.
        dropout: dropout between layers and before the classifier.
        pooling: ``"mean"``, ``"max"`` or ``"mean_max"`` over valid positions.

    Raises:
        ConfigError: an option out of range or not among the choices.
    """

    def __init__(self, num_classes: int = 26, num_hashes: int = 8, hash_bits: int = 128, seed: int = 0,
                 char_ngrams: int = 0, max_tokens: int = 64, bottleneck: int = 128, hidden: int = 96,
                 num_layers: int = 2, kernel: int = 2, zoneout: float = 0.1, dropout: float = 0.1,
                 pooling: str = "mean_max") -> None:
        super().__init__()
        check_int("model.num_classes", num_classes, low=2)
        check_int("model.bottleneck", bottleneck, low=1)
        check_int("model.hidden", hidden, low=1)
        check_int("model.num_layers", num_layers, low=1, high=16)
        check_int("model.kernel", kernel, low=1, high=16)
        check_number("model.zoneout", zoneout, low=0.0, high=1.0, high_inclusive=False)
        check_number("model.dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        check_choice("model.pooling", pooling, POOLINGS)
        self.projection = TernaryProjection(num_hashes, hash_bits, seed, char_ngrams, max_tokens)
        self.encoder = PQRNNEncoder(self.projection.out_features, num_classes, bottleneck, hidden, num_layers,
                                    kernel, zoneout, dropout, pooling)


@register_model("pqrnn")
def pqrnn(num_classes: int = 26, num_hashes: int = 8, hash_bits: int = 128, seed: int = 0, char_ngrams: int = 0,
          max_tokens: int = 64, bottleneck: int = 128, hidden: int = 96, num_layers: int = 2, kernel: int = 2,
          zoneout: float = 0.1, dropout: float = 0.1, pooling: str = "mean_max") -> PQRNN:
    """pQRNN on raw text: 512 ternary features, bottleneck 128, 2 bidirectional QRNN layers of 96 (~0.44M params)."""
    return PQRNN(num_classes, num_hashes, hash_bits, seed, char_ngrams, max_tokens, bottleneck, hidden,
                 num_layers, kernel, zoneout, dropout, pooling)


@register_model("pqrnn_tiny")
def pqrnn_tiny(num_classes: int = 26, seed: int = 0) -> PQRNN:
    """A tiny pQRNN for tests: 64 features, bottleneck 16, one QRNN layer of 8 per direction."""
    return PQRNN(num_classes, num_hashes=2, hash_bits=64, seed=seed, bottleneck=16, hidden=8, num_layers=1,
                 kernel=2, zoneout=0.1, dropout=0.0, pooling="mean_max")
