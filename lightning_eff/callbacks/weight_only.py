"""``WeightOnlyQuantization`` callback: b-bit packed weight files of the trained model, and the accuracy they keep.

Survey "Efficient Deep Learning" (Menghani, 2021) §3.1.2, "weight quantization": only the weights
are stored as low-bit codes with per-channel scales, and dequantized to float when the model is
loaded. It shrinks the download / flash footprint (4-bit is ~1/8 of fp32), not the compute: the
restored model runs the float kernels, so its latency row equals the float one.

At the end of fit (rank zero) the callback quantizes a CPU copy of the trained network once per
requested bit-width with the functional core (:mod:`lightning_eff.compression.quantization.weight_only`),
writes each packed file atomically, loads it back into a fresh copy (what a user of the file gets)
and compares that with the float model on real examples. The restored models are offered as
report variants ``weight_only_int<b>`` (``deployable_models()``): the end-of-run report measures
their test accuracy next to the float row, and ``artifacts()`` gives each file's bytes. At test
end it also records each variant's test accuracy and its drop versus the float model in those
entries, so a plain ``trainer.test`` shows the accuracy kept without the CLI's report.

``exportable = False`` tells the ``Export`` callback not to re-export these models: their
deployable form is the packed file; a TorchScript of the dequantized model is fp32-sized again.

Example:
    >>> wq = WeightOnlyQuantization(bits=[8, 4])
    >>> trainer = L.Trainer(max_epochs=1, callbacks=[wq])
    >>> trainer.fit(task, datamodule=dm)
    >>> _ = trainer.test(task, datamodule=dm, verbose=False)
    >>> [(a["variant"], a["bytes_ratio"] < 1.0, 0.0 <= a["test_acc"] <= 1.0) for a in wq.artifacts()]
    [('weight_only_int8', True, True), ('weight_only_int4', True, True)]
"""
from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_eff.batch import cpu_copy
from lightning_eff.callbacks.base import EffCallback, output_dir_option
from lightning_eff.callbacks.common import example_inputs
from lightning_eff.compression.quantization.weight_only import (
    DEFAULT_INCLUDE,
    load_quantized,
    quantize_weights,
    save_quantized,
    weight_quantization_error,
    weight_selector,
)
from lightning_eff.errors import ConfigError
from lightning_eff.measure import gzip_size, serialize_state_dict
from lightning_eff.validation import (
    as_list,
    check_bool,
    check_choice,
    check_int,
    renamed_option,
)

__all__ = ["WeightOnlyQuantization", "BITS", "WEIGHT_ONLY_SCHEMES"]

BITS = [2, 3, 4, 5, 6, 7, 8]
# Binary/ternary have their own bit-width (1 / 2) and are available in the functional core.
WEIGHT_ONLY_SCHEMES = ["affine", "symmetric"]


class WeightOnlyQuantization(EffCallback):
    """Write packed b-bit weight-only copies of the trained model and report the accuracy they keep.

    Args:
        bits: bit-widths to produce, each in 2..8 (default ``[8, 4, 2]``); one file and one report
            variant ``weight_only_int<b>`` per entry.
        scheme: ``"affine"`` (unsigned codes with zero point, survey Algorithm 2) or ``"symmetric"``.
        per_channel: one scale (and zero point) per output channel instead of one per tensor.
        include: module types and/or regexes searched in module names (default: every ``Linear`` and ``Conv2d``).
        exclude: regexes searched in module names; matching modules stay float.
        module_types: class names a selected module must also be (``None`` = any).
        min_params: weights with fewer elements stay float (a thin stem conv gains little, loses accuracy);
            ``min_numel`` is its old name. The four selection options are those of every technique.
        output_dir: folder of the files; default ``<trainer.default_root_dir>/weight_only`` (``dirpath`` is its old name).
        verify_examples: real examples the restored model is compared on (top-1 agreement, max error).
        module_attr: attribute of the LightningModule holding the network.

    Raises:
        ConfigError: a bit-width outside 2..8 or repeated, an empty ``bits``, an unknown scheme, or
            another option out of range (naming the option, the value and the valid choices).
    """

    exportable = False

    def __init__(
        self,
        bits: list[int] | None = None,
        scheme: str = "affine",
        per_channel: bool = True,
        min_params: int | None = None,
        output_dir: str | None = None,
        dirpath: str | None = None,
        verify_examples: int = 16,
        module_attr: str = "model",
        include: Any = None,
        exclude: list[str] | str | None = None,
        module_types: list[str] | str | None = None,
        min_numel: int | None = None,
    ) -> None:
        super().__init__(module_attr)
        bits = [8, 4, 2] if bits is None else as_list("bits", bits)
        if not bits:
            raise ConfigError(f"bits=[] produces nothing; choose bit-widths from {BITS}.")
        self.bits = [_check_bits(b) for b in bits]
        if len(set(self.bits)) != len(self.bits):
            raise ConfigError(f"bits={bits!r} repeats a bit-width; each of {BITS} may appear once.")
        self.scheme = check_choice("scheme", scheme, WEIGHT_ONLY_SCHEMES)
        self.per_channel = check_bool("per_channel", per_channel)
        min_params = renamed_option("min_params", min_params, "WeightOnlyQuantization", min_numel=min_numel)
        self.min_params = check_int("min_params", 0 if min_params is None else min_params, low=0)
        self.include = DEFAULT_INCLUDE if include is None else include
        self.exclude, self.module_types = exclude, module_types
        weight_selector(self.include, exclude, module_types)  # bad selection options fail here, not after training
        self.output_dir = output_dir_option(output_dir, "WeightOnlyQuantization", dirpath=dirpath)
        self.verify_examples = check_int("verify_examples", verify_examples, low=1)
        self._models: dict[str, nn.Module] = {}
        self._artifacts: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:  # noqa: D102
        # the selection options only where they differ from the defaults: a default instance keeps the key that
        # checkpoints written before these options existed carry
        return self.state_key_of(bits=tuple(self.bits), scheme=self.scheme, per_channel=self.per_channel,
                                 output_dir=self.output_dir, module_attr=self.module_attr,
                                 include=None if self.include is DEFAULT_INCLUDE else repr(self.include),
                                 exclude=None if self.exclude is None else repr(self.exclude),
                                 module_types=None if self.module_types is None else repr(self.module_types),
                                 min_params=self.min_params or None)

    # ------------------------------------------------------------------ hooks
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.is_global_zero:
            self.quantize(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if not trainer.is_global_zero:
            return
        if not self._models:  # test without a fit in this process: quantize the model being tested
            self.quantize(trainer, pl_module)
        self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def quantize(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Quantize, save atomically, reload and verify one copy per bit-width; returns the artifact entries."""
        net = cpu_copy(self.network(pl_module))
        folder = self.output_folder(trainer, self.output_dir, "weight_only")
        folder.mkdir(parents=True, exist_ok=True)
        float_bytes = len(serialize_state_dict(net))
        inputs = example_inputs(trainer, self.verify_examples)
        self._models, self._artifacts = {}, []
        for bits in self.bits:
            variant = f"weight_only_int{bits}"
            qw = quantize_weights(net, bits=bits, scheme=self.scheme, per_channel=self.per_channel,
                                  include=self.include, exclude=self.exclude, module_types=self.module_types, min_params=self.min_params)
            path = folder / f"{variant}.pt"
            save_quantized(qw, path)
            # The variant is what the file restores, not the in-memory codes: the round trip is part of the check.
            restored = load_quantized(path, copy.deepcopy(net)).eval()
            data = path.read_bytes()
            weights_fp32 = sum(qt.numel * 4 for qt in qw.tensors.values())
            errors = weight_quantization_error(net, qw)
            entry: dict[str, Any] = {
                "variant": variant, "format": "weight_only", "engine": None, "path": str(path), "bits": bits,
                "scheme": self.scheme, "per_channel": self.per_channel, "bytes": len(data), "gzip_bytes": gzip_size(data),
                "float_bytes": float_bytes, "bytes_ratio": len(data) / float_bytes,
                # packed codes + scales of the quantized tensors against those tensors in fp32
                "weights_fp32_bytes": weights_fp32,
                "weights_packed_bytes": sum(qt.nbytes for qt in qw.tensors.values()),
                "quantized_tensors": len(qw), "weight_rel_error": max(errors.values(), default=0.0),
            }
            if inputs is not None:
                entry.update(_agreement(net, restored, inputs))
            self._models[variant] = restored
            self._artifacts.append(entry)
        rank_zero_info(
            "WeightOnlyQuantization: " + ", ".join(f"{a['variant']} {a['bytes']} B ({a['bytes_ratio']:.3f}x)" for a in self._artifacts)
        )
        return self.artifacts()

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Test accuracy of the float model and of every restored variant on the trainer's test loader
        (``limit_test_batches`` respected); recorded in the artifact entries as ``test_acc`` / ``acc_drop``."""
        from lightning_eff.report import evaluate_accuracy

        loaders = trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None or not self._models:
            return {}
        limits = trainer.num_test_batches
        limit = limits[0] if isinstance(limits, (list, tuple)) and limits else None
        limit = int(limit) if limit is not None and limit != float("inf") else None
        accuracy = {"fp32": evaluate_accuracy(cpu_copy(self.network(pl_module)), loader, limit)}
        for entry in self._artifacts:
            acc = evaluate_accuracy(self._models[entry["variant"]], loader, limit)
            accuracy[entry["variant"]] = acc
            entry.update(test_acc=acc, test_acc_fp32=accuracy["fp32"], acc_drop=accuracy["fp32"] - acc)
        rank_zero_info("WeightOnlyQuantization test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in accuracy.items()))
        return accuracy

    def deployable_models(self) -> dict[str, nn.Module]:
        """``{"weight_only_int<b>": model restored from the packed file}`` (float kernels, b-bit weights)."""
        return dict(self._models)

    def artifacts(self) -> list[dict[str, Any]]:
        """One entry per packed file: bits, path, bytes (vs the float state_dict), verification, test accuracy."""
        return [dict(a) for a in self._artifacts]


def _check_bits(bits: Any) -> int:
    # 8.0 or True would pass a plain membership test (8.0 == 8, True == 1) and name files oddly.
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ConfigError(f"bits[]={bits!r} is not supported; choose integers from {BITS}.")
    return check_choice("bits[]", bits, BITS)


@torch.no_grad()
def _agreement(reference: nn.Module, restored: nn.Module, inputs: Any) -> dict[str, float]:
    if not isinstance(inputs, torch.Tensor):
        return {}
    ref, out = reference.eval()(inputs), restored(inputs)
    return {"top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).float().mean()),
            "max_abs_err": float((ref - out).abs().max()), "samples": int(inputs.shape[0])}
