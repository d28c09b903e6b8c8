"""``Export`` callback: write every deployable variant of the trained model, load it back, verify it.

At the end of fit it collects the trained float network and the int8 models that other callbacks
offer through ``deployable_models()`` (QAT, PTQ; callbacks with ``exportable = False``, such as
weight-only quantization, write their own files and are skipped), and writes, per variant and format:

* ``pt`` — TorchScript (float, or FX int8 with the engine recorded in the artifact's metadata);
* ``ptl`` — lite-interpreter (PyTorch Mobile) program, same metadata;
* ``pte`` — ExecuTorch program with the XNNPACK delegate: the float model, pt2e-quantized variants,
  and — when no pt2e variant exists — an int8 program made by pt2e static PTQ of the float model
  calibrated on training batches (``ptq_int8_xnnpack``). torch.ao/FX int8 models cannot go
  through ``torch.export``, so they are not lowered to ``.pte`` (logged, not an error). When the
  trained network is an FX *fake-quant* QAT model, its QAT-trained weights still reach ExecuTorch
  as ``qat_weights_ptq_int8_xnnpack``: the fake-quant modules are stripped (BN folded into the
  conv with its running statistics, exactly the weights the QAT forward quantized; each activation
  fake-quant kept as the clamp to its range, see :func:`float_from_fx_qat`), and that
  float network is quantized by pt2e static PTQ with XNNPACK's symmetric per-channel config,
  calibrated on training batches. We chose this over a second (pt2e) QAT pass because it costs
  no training and keeps one QAT run for all targets; the name says what it is: QAT-trained weights,
  pt2e-calibrated activation ranges (the QAT observers' FX ranges are not carried over);
* ``onnx`` — optional, float only.

Each file is loaded back and compared with the model it came from on real inputs different from
the tracing example (top-1 agreement, max error), its bytes and gzip bytes recorded and its
batch-1 latency measured through the loaded artifact. An export that fails is recorded with its
error and the run goes on: the trained model and its checkpoints are never touched.

Example:
    >>> from lightning_eff import QuantizationAwareTraining
    >>> export = Export(formats=["pt", "ptl"], latency=False)
    >>> trainer = L.Trainer(callbacks=[QuantizationAwareTraining(engines=["x86"]), export])
    >>> trainer.fit(task, datamodule=dm)
    >>> [(f"{a['variant']}.{a['format']}", a["verified"]) for a in export.artifacts()]
    [('qat_int8_x86.pt', True), ('qat_int8_x86.ptl', True)]
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_eff import export as ex
from lightning_eff.batch import batch_len, batch_rows, cpu_copy, model_inputs, to_cpu
from lightning_eff.callbacks.base import EffCallback
from lightning_eff.callbacks.common import example_inputs
from lightning_eff.compression.quantization.engines import int8_kernels_allowed
from lightning_eff.compression.quantization.fx import is_fake_quant, is_pt2e_int8
from lightning_eff.errors import ConfigError
from lightning_eff.measure import cpu_capability, file_bytes, gzip_size, measure_latency
from lightning_eff.naming import unwrap_model
from lightning_eff.protocols import offered_models
from lightning_eff.surgery import check_submodule, get_submodule, submodule_inputs
from lightning_eff.validation import as_list, check_bool, check_int, check_number

__all__ = ["Export", "FORMATS", "float_from_fx_qat", "fake_quant_clamp"]

FORMATS = ex.formats()  # the registered back ends (lightning_eff.export.registry)
_QAT_PTE = "qat_weights_ptq_int8_xnnpack"  # FX QAT-trained weights, pt2e PTQ-calibrated, XNNPACK int8
log = logging.getLogger(__name__)


def _is_fx_qat(model: nn.Module) -> bool:
    """An FX QAT-prepared network: torch.ao QAT modules carry a ``weight_fake_quant`` (pt2e graphs do not)."""
    return isinstance(model, torch.fx.GraphModule) and any(hasattr(m, "weight_fake_quant") for m in model.modules())


def float_from_fx_qat(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A float CPU copy of an FX QAT-prepared model computing what its QAT forward computes, for pt2e/ExecuTorch.

    Every torch.ao QAT module is replaced by its ``to_float()`` (fused Conv-BN(-ReLU) QAT modules fold
    BN with its running statistics, which is what the QAT forward quantized in eval mode). Each
    activation fake-quant becomes the **clamp to its quantization range** it applied
    (:func:`fake_quant_clamp`), not an identity: with ReLU6 replaced by ReLU for fusion, those clamps
    are the only bound on the activations the network was trained with. Dropping them let a
    briefly-trained MobileNet's activations grow layer by layer to ~1e14 (its QAT forward: ~6), so
    the "reference" was garbage and the int8 ``.pte`` calibrated on it overflowed the int32
    requantization of XNNPACK's AVX-512 kernels (garbage on VNNI/AMX CPUs, top-1 matching only by
    luck on AVX2). ``prepared`` is not modified.
    """
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    model = cpu_copy(prepared)
    for node in list(model.graph.nodes):
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        if isinstance(module, FakeQuantizeBase):
            clamp = fake_quant_clamp(module)
            if clamp is None:
                node.replace_all_uses_with(node.args[0])
                model.graph.erase_node(node)
            else:
                model.set_submodule(node.target, clamp)
        elif hasattr(module, "weight_fake_quant") and callable(getattr(module, "to_float", None)):
            model.set_submodule(node.target, module.to_float().eval())
    model.delete_all_unused_submodules()
    model.recompile()
    return model.eval()


def fake_quant_clamp(fake_quant: nn.Module) -> nn.Module | None:
    """``Hardtanh(lo, hi)`` with the float range a per-tensor fake-quant clamps to, or ``None`` (identity).

    ``lo = (quant_min - zero_point) * scale`` and ``hi = (quant_max - zero_point) * scale``: the
    fake-quant's output without its rounding. ``None`` when fake quantization is off or per-channel
    (activations are per-tensor in every flow we prepare).
    """
    enabled = getattr(fake_quant, "fake_quant_enabled", None)
    if enabled is None or not bool(enabled[0]):
        return None
    scale, zero_point = fake_quant.scale.detach().cpu().reshape(-1), fake_quant.zero_point.detach().cpu().reshape(-1)
    if scale.numel() != 1:
        return None
    observer = getattr(fake_quant, "activation_post_process", fake_quant)
    qmin = getattr(observer, "quant_min", getattr(fake_quant, "quant_min", None))
    qmax = getattr(observer, "quant_max", getattr(fake_quant, "quant_max", None))
    if qmin is None or qmax is None:
        return None
    s, z = float(scale), int(zero_point)
    return nn.Hardtanh((qmin - z) * s, (qmax - z) * s)


def _is_int8(model: nn.Module) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_quantized for t in model.state_dict().values()) or any(
        "quantized" in type(m).__module__ for m in model.modules()
    )


def _mark_unverified(entry: dict[str, Any], path: Path) -> None:
    """Rename the file this attempt wrote, which failed (or never finished) verification, to ``<name>.unverified.<fmt>``.

    A failure before the write leaves ``entry`` without a path; a file at ``path`` from an earlier
    run is then not this attempt's and is left alone.
    """
    if "path" not in entry or not path.exists():
        entry.pop("path", None)
        return
    marked = path.with_name(f"{path.stem}.unverified{path.suffix}")
    try:
        os.replace(path, marked)
        sidecar = path.with_name(path.name + ".json")
        if sidecar.exists():
            os.replace(sidecar, marked.with_name(marked.name + ".json"))
        entry["path"] = str(marked)
    except OSError as err:  # cannot rename: remove it rather than leave it looking good
        path.unlink(missing_ok=True)
        entry.pop("path", None)
        entry["error"] += f" (could not mark the file unverified: {err}; removed)"


class Export(EffCallback):
    """Export, reload and verify every deployable model at the end of fit.

    Args:
        formats: any of ``"pt"``, ``"ptl"``, ``"pte"``, ``"onnx"``.
        variants: names to export (e.g. ``["fp32", "qat_int8_x86"]``); ``None`` = all.
        include_float: export the trained float network as variant ``"fp32"`` (skipped
            automatically while it carries fake-quant modules).
        int8_pte: for ``pte``, also make ``ptq_int8_xnnpack`` by pt2e PTQ of the float model when
            no pt2e-quantized variant is offered, or ``qat_weights_ptq_int8_xnnpack`` from the
            weights of an FX QAT-trained network (see the module docstring).
        calibration_batches: batches for that PTQ.
        output_dir: where to write; default ``<trainer.default_root_dir>/artifacts``.
        verify: load back and compare on new inputs.
        verify_examples: how many real examples the comparison uses.
        latency: measure the loaded artifact's batch-1 latency.
        module_attr: attribute of the LightningModule holding the network.
        submodule: export this (dotted) submodule of every variant instead of the whole network,
            e.g. ``"encoder"`` of the projection models (their string hashing is Python
            pre-processing): its inputs are captured by running each variant on the real examples,
            and it is scripted (loops stay loops, so any sequence length works). Skips the
            automatic int8 ``.pte`` (its calibration feeds the whole network's inputs).
        strict: raise on the first failed export instead of recording it.
        min_sqnr_db: an int8 artifact whose outputs reach a lower SQNR against the model it came
            from (``10·log10(Σref²/Σerr²)``, quantization error included) fails verification.
        min_sqnr_db_float: the same floor for float artifacts (only the runtime's rounding differs).
        freeze: ``.pt`` files are frozen TorchScript (``torch.jit.freeze``: BatchNorm folded, weights
            constant; faster on CPU, inference only).
        channels_last: ``.pt`` files of float variants run NHWC inside the graph (callers keep passing
            NCHW); int8 variants and the other formats keep their runtime's own layout (XNNPACK and the
            int8 kernels pick theirs).

    An artifact that fails verification (or whose verification raised) is never left looking like a
    good one: the file is renamed ``<variant>.unverified.<fmt>`` and its entry says
    ``"verified": False`` with the reason. Under ``Trainer(deterministic=True)`` the int8 kernels
    run with determinism relaxed to warn-only for the export (a warning says so).

    Raises:
        ConfigError: unknown format or bad option.
    """

    def __init__(
        self,
        formats: list[str] | None = None,
        variants: list[str] | None = None,
        include_float: bool = True,
        int8_pte: bool = True,
        calibration_batches: int = 16,
        output_dir: str | None = None,
        verify: bool = True,
        verify_examples: int = 16,
        latency: bool = True,
        module_attr: str = "model",
        submodule: str | None = None,
        strict: bool = False,
        min_sqnr_db: float = 10.0,
        min_sqnr_db_float: float = 30.0,
        freeze: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(module_attr)
        formats = ["pt", "ptl", "pte"] if formats is None else as_list("formats", formats, item=str)
        if not formats:
            raise ConfigError(f"formats=[] exports nothing; choose from {ex.formats()}.")
        self.formats = [ex.get_exporter(f).format for f in formats]
        self.variants = as_list("variants", variants, item=str, allow_none=True)
        self.include_float = check_bool("include_float", include_float)
        self.int8_pte = check_bool("int8_pte", int8_pte)
        self.calibration_batches = check_int("calibration_batches", calibration_batches, low=1)
        self.output_dir = output_dir
        self.verify = check_bool("verify", verify)
        self.verify_examples = check_int("verify_examples", verify_examples, low=2)
        self.latency = check_bool("latency", latency)
        self.submodule = check_submodule(submodule)
        self.strict = check_bool("strict", strict)
        self.min_sqnr_db = float(check_number("min_sqnr_db", min_sqnr_db))
        self.min_sqnr_db_float = float(check_number("min_sqnr_db_float", min_sqnr_db_float))
        self.freeze = check_bool("freeze", freeze)
        self.channels_last = check_bool("channels_last", channels_last)
        self._artifacts: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:  # noqa: D102
        variants = None if self.variants is None else tuple(self.variants)
        return self.state_key_of(formats=tuple(self.formats), variants=variants, output_dir=self.output_dir,
                                 module_attr=self.module_attr, submodule=self.submodule)

    # ------------------------------------------------------------------ hooks
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.is_global_zero:
            self.export(trainer, pl_module)

    def artifacts(self) -> list[dict[str, Any]]:
        """One entry per attempted export: variant, format, engine, path, bytes, gzip_bytes, verification, latency or error."""
        return [dict(a) for a in self._artifacts]

    # ------------------------------------------------------------------ work
    def _models(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, nn.Module]:
        models: dict[str, nn.Module] = {}
        net = self.network(pl_module)
        if self.include_float and not is_fake_quant(net):
            models["fp32"] = cpu_copy(unwrap_model(net))  # a compile / checkpoint wrapper is not what ships
        # exportable=False: the callback's own files are the artifact (weight-only packed codes);
        # a TorchScript/.pte of its dequantized float model would only be fp32 bytes again.
        models.update(offered_models(trainer.callbacks, skip=self, exportable_only=True))
        if self.variants is not None:
            unknown = sorted(set(self.variants) - set(models))
            if unknown:
                rank_zero_warn(f"Export: variants {unknown} were not produced; available: {sorted(models)}")
            models = {k: v for k, v in models.items() if k in self.variants}
        return models

    def _calibration(self, trainer: L.Trainer) -> list[tuple]:
        """``calibration_batches`` training batches (whole: the back end calibrates them at once where the graph
        allows a dynamic batch, else one example at a time; the ``.pte`` keeps the example's static batch of 1)."""
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else None
        batches: list[tuple] = []
        for i, batch in enumerate(loader or []):
            if i >= self.calibration_batches:
                break
            batches.append((to_cpu(model_inputs(batch)),))
        return batches

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Export every selected variant in every format; returns the artifact entries."""
        started = time.perf_counter()
        with int8_kernels_allowed():  # Trainer(deterministic=True) leaves the flag on; int8 kernels refuse it
            out = self._export(trainer, pl_module)
        log.info("Export: %d artifacts exported, reloaded and verified (%d failed) in %.0f s", sum("path" in a for a in out),
                 sum(a.get("verified") is False for a in out), time.perf_counter() - started)
        return out

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        out_dir = self.output_folder(trainer, self.output_dir, "artifacts")
        out_dir.mkdir(parents=True, exist_ok=True)
        examples = example_inputs(trainer, self.verify_examples + 1)
        if examples is None:
            raise ConfigError("Export needs example inputs: give the datamodule a sample_inputs(n) method.")
        # Verification uses real examples other than the tracing example, one at a time for .pte
        # (static shapes) and as one batch for TorchScript (checks the batch dim is not baked in).
        n = batch_len(examples)
        split = (batch_rows(examples, 0, 1), [batch_rows(examples, i, i + 1) for i in range(1, n)], [batch_rows(examples, 1)])
        example, verify_single, verify_batch = split
        models = self._models(trainer, pl_module)
        self._artifacts = []
        for variant, model in models.items():
            if self.submodule:  # the part to export, and the arguments it receives from the real examples
                try:
                    example, verify_single, verify_batch = (
                        submodule_inputs(model, self.submodule, split[0]),
                        [submodule_inputs(model, self.submodule, x) for x in split[1]],
                        [submodule_inputs(model, self.submodule, x) for x in split[2]],
                    )
                    model = get_submodule(model, self.submodule)
                except Exception as err:  # a variant without that part is recorded, never fatal
                    if self.strict:
                        raise
                    self._artifacts.append({"variant": variant, "format": None, "engine": None,
                                            "error": f"{type(err).__name__}: {err}"})
                    rank_zero_warn(f"Export: {variant} not exported: {err}")
                    continue
            int8 = _is_int8(model)
            pt2e_q = is_pt2e_int8(model)
            for fmt in self.formats:
                reason = ex.get_exporter(fmt).skip_reason(model, int8, pt2e_q)
                if reason:
                    log.info("Export: no .%s of %s: %s", fmt, variant, reason)
                    continue
                self._export_one(variant, model, fmt, out_dir, example, verify_batch if fmt in ("pt", "ptl") else verify_single)
        if "pte" in self.formats and self.int8_pte and not self.submodule and not any(is_pt2e_int8(m) for m in models.values()):
            net = self.network(pl_module)
            if "fp32" in models:
                self._export_one("ptq_int8_xnnpack", models["fp32"], "pte", out_dir, example, verify_single,
                                 int8=True, calibration=self._calibration(trainer))
            elif _is_fx_qat(net) and (self.variants is None or _QAT_PTE in self.variants):
                self._export_one(_QAT_PTE, float_from_fx_qat(net), "pte", out_dir, example, verify_single,
                                 int8=True, calibration=self._calibration(trainer))
        rank_zero_info(f"Export: wrote {sum('path' in a for a in self._artifacts)} artifacts to {out_dir}")
        return self.artifacts()

    def _export_one(self, variant: str, model: nn.Module, fmt: str, out_dir: Path, example: Any,
                    verify_inputs: list, int8: bool = False, calibration: list | None = None) -> None:
        exporter = ex.get_exporter(fmt)
        engine = exporter.engine(model)
        path = out_dir / f"{variant}{exporter.suffix}"
        entry: dict[str, Any] = {"variant": variant, "format": fmt, "engine": engine}
        try:
            # FX int8 graphs are scripted: tracing them turns the (constant) input scale into a
            # Python float, which the tracer rightly flags; float models are traced.
            # A submodule gets captured argument tuples and is scripted (its loops must not unroll).
            method = "script" if _is_int8(model) or self.submodule else "trace"
            args = example if isinstance(example, tuple) else (example,)
            layout = {"freeze": self.freeze, "channels_last": self.channels_last and not _is_int8(model)} if fmt == "pt" else {}
            exporter.write(model, args, path, method=method, int8=int8, calibration=calibration, **layout)
            entry.update(path=str(path), bytes=file_bytes(path), gzip_bytes=gzip_size(path))
            artifact = ex.load_artifact(path)
            if self.verify:
                # For int8=True .pte the reference is the float model it was quantized from, so the
                # figures include the quantization error, not just the export's fidelity.
                entry.update(ex.verify_artifact(model, artifact, verify_inputs, example_inputs=args))
                floor = self.min_sqnr_db if (int8 or _is_int8(model)) else self.min_sqnr_db_float
                entry["min_sqnr_db"] = floor
                if not entry["sqnr_db"] >= floor:
                    raise ex.ExportError(
                        f"verification failed: SQNR {entry['sqnr_db']:.1f} dB < {floor:g} dB against the model it came from "
                        f"(max abs error {entry['max_abs_err']:.3g}, top-1 agreement {entry['top1_agreement']:.2f}, "
                        f"CPU {cpu_capability()})")
                entry["verified"] = True
        except Exception as err:  # one failed export must not cost the run (or the other artifacts)
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["verified"] = False
            _mark_unverified(entry, path)
            if self.strict:
                raise
            rank_zero_warn(f"Export: {variant} -> .{fmt} failed: {entry['error']}")
        else:
            path.with_name(f"{path.stem}.unverified{path.suffix}").unlink(missing_ok=True)  # a previous run's failure
            if self.latency:
                try:  # a failed timing leaves a verified artifact verified
                    entry["latency_ms_b1"] = measure_latency(artifact, args, warmup=3, repeats=20)
                except Exception as err:
                    entry["latency_error"] = f"{type(err).__name__}: {err}"
        self._artifacts.append(entry)
