"""``python -m lightning_eff.bench quantization [--quick]``: generic int8 path vs torchvision's hand-fused model.

Question: does our *generic* QAT path (any conv net, timm included: fuse -> prepare_qat_fx ->
QAT steps -> convert) give an int8 model as fast and as small as torchvision's hand-written
quantizable MobileNetV2 (its own ``fuse_model`` + eager ``prepare_qat`` + ``convert``)?

Measured side by side in one process, same engine, fixed threads, through the one interleaved
timer (:func:`lightning_eff.measure.time_interleaved`: warm-up, then rounds in which every variant
runs in turn, so neighbour processes slow down every variant alike); figures are ratios of the
medians over all timed calls, and ``noisy=1`` ends the ``RESULT`` line when one of them came from
rounds that disagree by more than the timer's ``max_spread`` (the JSON's ``timings`` names them):

* x86: our timm ``mobilenetv2_100`` int8 TorchScript vs torchvision's int8 TorchScript
  (latency and file bytes), and vs our fp32 eager model / fp32 TorchScript bytes;
* qnnpack: our int8 vs fp32 eager, and vs torchvision's int8 model through its own eager QAT flow
  for the ``qnnpack`` engine (``fuse_model``, ``prepare_qat``, ``convert``; scripted the same way),
  all in the same interleaved run as the x86 variants (``qnnpack_latency_vs_torchvision``);
* ExecuTorch (XNNPACK): pt2e int8 ``.pte`` vs fp32 ``.pte``, ours and torchvision's MobileNetV2 (the peer);
* QAT training-step overhead: one SGD step of our FX QAT-prepared model, of our fp32 model, of
  torchvision's eager QAT model and of its float model, the four interleaved;
  ``qat_step_overhead`` = ours (QAT / fp32), ``qat_step_overhead_vs_torchvision`` = ours (QAT / fp32)
  over torchvision's (QAT / float);
* the same generic path on timm ``mobilenetv3_large_100``, ``efficientnet_b0``, ``resnet18``
  (convert, export, verify on perturbed inputs; latency / bytes ratios);
* int8 vs fp32 where it was reported slower (``WORST_CASE_ARCHS``: the 32x32 MobileNetV2 0.5 of
  ``make train``, timm ``mobilenetv3_small_100``) at batch 1 and 32, for the x86 engine (FBGEMM,
  oneDNN on VNNI CPUs), FBGEMM forced, QNNPACK and ExecuTorch int8. ``worst_int8_vs_fp32`` is the
  slowest x86-CPU int8 form (x86, fbgemm, ExecuTorch) relative to fp32 eager over every architecture
  and batch size, and the ExecuTorch int8 ``.pte`` of MobileNetV2 against its fp32 ``.pte``
  (target < 1); the JSON names the fastest int8 form per architecture and batch.

Models are randomly initialised (no downloads); QAT runs a few steps on random data, enough
for observers and BN statistics, not for accuracy. Latency and size do not depend on weights.

On a shared 2-core machine, ``--threads 2`` measures the neighbours more than the models (one
busy neighbour made fp32 eager MobileNetV2 take 2.1 s instead of 21 ms: OpenMP threads spin
against each other); the JSON records the load average before and after, and ``--threads 1``
gives stable ratios there.
"""
from __future__ import annotations

import copy
import functools
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_eff.bench.common import Timings, bench_parser, set_threads, write_bench
from lightning_eff.compression.quantization.engines import quantized_engine
from lightning_eff.compression.quantization.fx import (
    convert_fx_model,
    prepare_qat_fx_model,
)
from lightning_eff.export import (
    export_torchscript,
    load_artifact,
    perturbed_inputs,
    verify_artifact,
)
from lightning_eff.measure import cpu_capability, file_bytes, train_step_fn

__all__ = ["main"]

TARGETS = {
    "x86_latency_vs_torchvision": 1.1,
    "x86_bytes_vs_torchvision": 1.05,
    "x86_latency_vs_fp32": 0.2,
    "int8_bytes_vs_fp32": 0.27,
    "qnnpack_latency_vs_fp32": 0.6,
    "executorch_int8_vs_fp32": 0.8,
}
OTHER_ARCHS = ("mobilenetv3_large_100", "efficientnet_b0", "resnet18")
#: The statistic every figure of this benchmark is a ratio of: the median over all timed calls.
STAT = "median_ms"


def _timm(arch: str) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=1000)


def _qat_steps(prepared: nn.Module, size: int, steps: int, batch: int) -> None:
    """A few SGD steps on random images: observers and BN statistics see realistic traffic."""
    prepared.train()
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, generator=gen)
        y = torch.randint(0, 1000, (batch,), generator=gen)
        loss = nn.functional.cross_entropy(prepared(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prepared.eval()


def _interleaved(timer: Timings, label: str, variants: dict[str, tuple[Callable, str | None]], x: torch.Tensor, rounds: int,
                 repeats: int, threads: int) -> dict[str, float]:
    """``{name: median ms}`` of every variant on ``x`` under its quantized engine, through the one interleaved timer.

    Two warm-up calls each, then ``rounds`` rounds of ``repeats`` calls per variant; the timing
    (min, median, spread, noisy) is stored in ``timer`` under ``label``.
    """
    models = {name: fn for name, (fn, _) in variants.items()}
    contexts = {name: functools.partial(quantized_engine, engine) for name, (_, engine) in variants.items() if engine is not None}
    timing = timer.time_models(label, models, (x,), rounds=rounds, repeats=repeats, warmup=2, threads=threads, contexts=contexts)
    return {name: round(ms, 3) for name, ms in timing.stat(STAT).items()}


def _torchvision_float() -> nn.Module:
    """torchvision's quantizable MobileNetV2 as a float network (its stubs are identities until ``prepare_qat``)."""
    from torchvision.models.quantization import mobilenet_v2

    torch.manual_seed(0)
    return mobilenet_v2(weights=None, quantize=False)


def _torchvision_qat(engine: str, size: int, steps: int, batch: int) -> nn.Module:
    """torchvision's hand-fused quantizable MobileNetV2 through its own eager QAT flow for ``engine``.

    ``fuse_model(is_qat=True)``, the engine's default QAT qconfig, ``prepare_qat`` and ``steps``
    QAT steps; returns the prepared (fake-quantized, float) model in eval mode.
    """
    model = _torchvision_float()
    model.train()
    model.fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig(engine)
    with quantized_engine(engine):
        torch.ao.quantization.prepare_qat(model, inplace=True)
        _qat_steps(model, size, steps, batch)
    return model


def _torchvision_int8(prepared: nn.Module, engine: str) -> nn.Module:
    """The int8 model of a :func:`_torchvision_qat` model, converted under ``engine`` (``prepared`` is left as is)."""
    with quantized_engine(engine):
        return torch.ao.quantization.convert(prepared.eval(), inplace=False)


def _executorch(timer: Timings, float_model: nn.Module, x: torch.Tensor, folder: Path, rounds: int, repeats: int,
                threads: int) -> dict[str, Any]:
    """Our model's int8 vs fp32 ``.pte``, and the same pair for torchvision's hand-written MobileNetV2 (the peer)."""
    from torchvision.models import (
        mobilenet_v2,  # the plain model: the quantizable one carries torch.ao stubs
    )

    from lightning_eff.export import export_executorch

    torch.manual_seed(0)
    peer = mobilenet_v2(weights=None).eval()
    calib = [x] + [b[0] for b in perturbed_inputs(x, 3, seed=11)]
    paths = {}
    for name, model in (("ours", float_model), ("torchvision", peer)):
        paths[f"{name}_fp32"] = export_executorch(model, (x,), folder / f"{name}_fp32.pte")
        paths[f"{name}_int8"] = export_executorch(model, (x,), folder / f"{name}_int8.pte", int8=True, calibration=calib)
    arts = {k: load_artifact(p) for k, p in paths.items()}
    lat = _interleaved(timer, "executorch", {k: (a, None) for k, a in arts.items()}, x, rounds, repeats, threads)
    check = verify_artifact(float_model, arts["ours_int8"], perturbed_inputs(x, 2, seed=5))
    return {
        "fp32_ms": lat["ours_fp32"], "int8_ms": lat["ours_int8"],
        "fp32_bytes": file_bytes(paths["ours_fp32"]), "int8_bytes": file_bytes(paths["ours_int8"]),
        "int8_vs_fp32": round(lat["ours_int8"] / lat["ours_fp32"], 3),
        "int8_top1_agreement_vs_float": check["top1_agreement"],
        "int8_sqnr_db_vs_float": check["sqnr_db"],
        "torchvision_fp32_ms": lat["torchvision_fp32"], "torchvision_int8_ms": lat["torchvision_int8"],
        "torchvision_int8_vs_fp32": round(lat["torchvision_int8"] / lat["torchvision_fp32"], 3),
    }


def _generic(timer: Timings, arch: str, size: int, steps: int, batch: int, folder: Path, rounds: int, repeats: int,
             threads: int) -> dict[str, Any]:
    """Our generic path on another timm architecture: ratios plus an export verification."""
    model = _timm(arch).eval()
    x = torch.randn(1, 3, size, size)
    prepared = prepare_qat_fx_model(model, (x,), engine="x86")
    _qat_steps(prepared, size, steps, batch)
    int8 = convert_fx_model(prepared)
    path = export_torchscript(int8, (x,), folder / f"{arch}_int8.pt")
    fp32_path = export_torchscript(model, (x,), folder / f"{arch}_fp32.pt")
    art = load_artifact(path)
    batches = perturbed_inputs(x, 2, seed=3) + [(torch.randn(2, 3, size, size),)]
    exact = verify_artifact(int8, art, batches, example_inputs=(x,))
    lat = _interleaved(timer, f"other_archs/{arch}", {"fp32_eager": (model, None), "int8": (art, "x86")}, x, rounds, repeats, threads)
    return {
        "input": size,
        "fp32_eager_ms": lat["fp32_eager"], "int8_ms": lat["int8"],
        "latency_vs_fp32": round(lat["int8"] / lat["fp32_eager"], 3),
        "fp32_bytes": file_bytes(fp32_path), "int8_bytes": file_bytes(path),
        "bytes_vs_fp32": round(file_bytes(path) / file_bytes(fp32_path), 3),
        "artifact_max_abs_err_vs_int8_eager": exact["max_abs_err"],
        "artifact_top1_agreement": exact["top1_agreement"],
    }


#: Where int8 was reported slower than fp32 (issue 14): the 32x32 grey MobileNetV2 0.5 of ``make train`` and
#: timm's mobilenetv3_small_100 (hard-swish, squeeze-excite) at 224. Timed at every batch size.
WORST_CASE_ARCHS = {
    "mobilenetv2_050_32px": dict(name="mobilenetv2", width=0.5, small_input_stages=1, num_classes=10, in_chans=1, size=32),
    "mobilenetv3_small_100": dict(timm="mobilenetv3_small_100", size=224),
}
#: int8 forms for x86 CPUs: the x86 engine (FBGEMM, or oneDNN on VNNI CPUs), FBGEMM forced, ExecuTorch XNNPACK.
#: QNNPACK (an ARM backend, slower than fp32 on x86 for torchvision's model too) is timed but not in the worst case.
X86_INT8_FORMS = ("x86", "fbgemm", "executorch")


def _worst_case_model(spec: dict[str, Any]) -> tuple[nn.Module, int, int]:
    spec = dict(spec)
    size = spec.pop("size")
    torch.manual_seed(0)
    if "timm" in spec:
        return _timm(spec["timm"]).eval(), 3, size
    from lightning_eff.models import create_model

    return create_model(**spec).eval(), spec["in_chans"], size


def _int8_vs_fp32(timer: Timings, arch: str, spec: dict[str, Any], batches: tuple[int, ...], folder: Path, rounds: int,
                  repeats: int, threads: int, executorch: bool) -> dict[str, Any]:
    """Every int8 form of one architecture against its fp32 eager model, at every batch size, interleaved.

    Timings are stored in ``timer`` as ``int8_vs_fp32/<arch>/b<batch>``.
    """
    model, chans, size = _worst_case_model(spec)
    x1 = torch.randn(1, chans, size, size, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(3)
    calib = [torch.randn(4, chans, size, size, generator=gen) for _ in range(4)]
    forms: dict[str, tuple[Callable, str | None]] = {}
    for engine in ("x86", "fbgemm", "qnnpack"):
        from lightning_eff.compression.quantization.fx import (
            calibrate,
            prepare_ptq_fx_model,
        )

        prepared = prepare_ptq_fx_model(model, (x1,), engine=engine)
        calibrate(prepared, calib)
        int8 = convert_fx_model(prepared, engine=engine)
        path = export_torchscript(int8, (x1,), folder / f"{arch}_{engine}.pt", method="script")
        forms[engine] = (load_artifact(path), engine)
    out: dict[str, Any] = {"input": [chans, size, size], "ratios": {}, "ms": {}}
    for batch in batches:
        x = x1.repeat(batch, 1, 1, 1)
        variants = {"fp32_eager": (model, None), **forms}
        if executorch:
            from lightning_eff.export import export_executorch

            pte = export_executorch(model, (x,), folder / f"{arch}_b{batch}_int8.pte", int8=True, calibration=[c[:1].repeat(batch, 1, 1, 1) for c in calib])
            variants["executorch"] = (load_artifact(pte), None)
        lat = _interleaved(timer, f"int8_vs_fp32/{arch}/b{batch}", variants, x, rounds, repeats, threads)
        out["ms"][f"b{batch}"] = lat
        out["ratios"][f"b{batch}"] = {k: round(v / lat["fp32_eager"], 3) for k, v in lat.items() if k != "fp32_eager"}
        best = min((k for k in lat if k != "fp32_eager"), key=lat.get)
        out.setdefault("fastest_int8", {})[f"b{batch}"] = best
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; return the ``RESULT`` dict (also written to ``bench_results/quantization.json``)."""
    parser = bench_parser("quantization", __doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input resolution for the MobileNetV2 comparison")
    parser.add_argument("--skip-executorch", action="store_true", help="skip the ExecuTorch .pte comparison")
    parser.add_argument("--skip-archs", action="store_true", help="skip the other timm architectures")
    parser.add_argument("--skip-worst-case", action="store_true", help="skip the int8-vs-fp32 worst-case architectures")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(quantize_per_tensor|reduce_range|_empty_affine).*")
    quick = args.quick
    size = args.size
    rounds, repeats = (3, 5) if quick else (5, 10)
    qat_steps, qat_batch = (2, 2) if quick else (4, 8)
    step_batch, step_size, step_rounds = (8, 112, 3) if quick else (16, 224, 5)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    details: dict[str, Any] = {"load_average_before": list(os.getloadavg()), "settings": {
        "quick": quick, "size": size, "threads": threads, "rounds": rounds, "repeats": repeats,
        "qat_steps": qat_steps, "qat_batch": qat_batch, "step_rounds": step_rounds, "stat": STAT, "targets": TARGETS,
    }}
    timer = Timings()
    clock = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # ---- ours: timm mobilenetv2_100 through the generic path, x86 and qnnpack
        model = _timm("mobilenetv2_100").eval()
        ours = {}
        for engine in ("x86", "qnnpack"):
            prepared = prepare_qat_fx_model(model, (x,), engine=engine)
            _qat_steps(prepared, size, qat_steps, qat_batch)
            int8 = convert_fx_model(prepared)
            ours[engine] = export_torchscript(int8, (x,), folder / f"ours_{engine}.pt")
            if engine == "x86":
                check = verify_artifact(int8, load_artifact(ours[engine]), perturbed_inputs(x, 2), example_inputs=(x,))
                details["ours_x86_artifact_max_abs_err"] = check["max_abs_err"]
        lap("ours_prepare_qat_convert_export")
        fp32_ts = export_torchscript(model, (x,), folder / "fp32.pt")
        tv_qat, tv_paths = {}, {}
        for engine in ("x86", "qnnpack"):
            tv_qat[engine] = _torchvision_qat(engine, size, qat_steps, qat_batch)
            # Same export method for both: script (tracing either int8 model warns about its constant scales).
            tv_paths[engine] = export_torchscript(_torchvision_int8(tv_qat[engine], engine), (x,), folder / f"torchvision_{engine}.pt",
                                                  method="script", engine=engine)
        variants = {
            "fp32_eager": (model, None),
            "ours_x86": (load_artifact(ours["x86"]), "x86"),
            "torchvision_x86": (load_artifact(tv_paths["x86"]), "x86"),
            "ours_qnnpack": (load_artifact(ours["qnnpack"]), "qnnpack"),
            "torchvision_qnnpack": (load_artifact(tv_paths["qnnpack"]), "qnnpack"),
        }
        lap("torchvision_qat_convert_export")
        lat = _interleaved(timer, "mobilenetv2", variants, x, rounds, repeats, threads)
        lap("latency")
        sizes = {"fp32_torchscript": file_bytes(fp32_ts), "ours_x86": file_bytes(ours["x86"]),
                 "torchvision_x86": file_bytes(tv_paths["x86"]), "ours_qnnpack": file_bytes(ours["qnnpack"]),
                 "torchvision_qnnpack": file_bytes(tv_paths["qnnpack"])}
        details["mobilenetv2_latency_ms"] = lat
        details["mobilenetv2_bytes"] = sizes
        # ---- QAT step overhead: one SGD step of ours (FX QAT, fp32) and torchvision's (eager QAT, float), interleaved
        gen = torch.Generator().manual_seed(4)
        sx = torch.randn(step_batch, 3, step_size, step_size, generator=gen)
        sy = torch.randint(0, 1000, (step_batch,), generator=gen)
        qat_model = prepare_qat_fx_model(model, (torch.randn(1, 3, step_size, step_size),), engine="x86")
        steps = {
            "fp32": train_step_fn(copy.deepcopy(model), sx, sy),
            "qat": train_step_fn(qat_model, sx, sy),
            "torchvision_fp32": train_step_fn(_torchvision_float(), sx, sy),
            "torchvision_qat": train_step_fn(tv_qat["x86"], sx, sy),
        }
        step_timing = timer.time("train_step", steps, rounds=step_rounds, repeats=1, warmup=1, threads=threads)
        del steps, qat_model, tv_qat
        lap("qat_step_overhead")
        details["train_step_s"] = {**{k: round(ms / 1000.0, 4) for k, ms in step_timing.stat(STAT).items()},
                                   "batch": step_batch, "size": step_size}
        # ---- ExecuTorch
        if not args.skip_executorch:
            et_size = size
            et_x = torch.randn(1, 3, et_size, et_size, generator=torch.Generator().manual_seed(1))
            details["executorch"] = _executorch(timer, model, et_x, folder, rounds, repeats, threads)
            details["executorch"]["input"] = et_size
            lap("executorch")
        # ---- other architectures through the same generic path
        if not (args.skip_archs or quick):
            details["other_archs"] = {
                arch: _generic(timer, arch, size, qat_steps, qat_batch, folder, rounds, repeats, threads) for arch in OTHER_ARCHS
            }
        lap("other_archs")
        # ---- where int8 was reported slower than fp32: every x86 int8 form, every batch size
        if not args.skip_worst_case:
            wc_batches = (1, 8) if quick else (1, 32)
            details["int8_vs_fp32"] = {
                arch: _int8_vs_fp32(timer, arch, spec, wc_batches, folder, rounds, repeats, threads, not args.skip_executorch)
                for arch, spec in WORST_CASE_ARCHS.items()
            }
            lap("int8_vs_fp32")
    details["wall_s"] = timings
    details["load_average_after"] = list(os.getloadavg())
    ours_qat_overhead = step_timing.ratio("qat", "fp32", STAT)
    tv_qat_overhead = step_timing.ratio("torchvision_qat", "torchvision_fp32", STAT)
    details["train_step_overhead"] = {"ours": round(ours_qat_overhead, 4), "torchvision": round(tv_qat_overhead, 4)}
    et = details.get("executorch", {})
    result = {
        "x86_latency_vs_torchvision": timer.ratio("x86_latency_vs_torchvision", "mobilenetv2", "ours_x86", "torchvision_x86", STAT),
        "x86_bytes_vs_torchvision": sizes["ours_x86"] / sizes["torchvision_x86"],
        "x86_latency_vs_fp32": timer.ratio("x86_latency_vs_fp32", "mobilenetv2", "ours_x86", "fp32_eager", STAT),
        "int8_bytes_vs_fp32": sizes["ours_x86"] / sizes["fp32_torchscript"],
        "qnnpack_latency_vs_fp32": timer.ratio("qnnpack_latency_vs_fp32", "mobilenetv2", "ours_qnnpack", "fp32_eager", STAT),
        # our int8 model and torchvision's hand-written one under QNNPACK, in the same interleaved run
        "qnnpack_latency_vs_torchvision": timer.ratio("qnnpack_latency_vs_torchvision", "mobilenetv2", "ours_qnnpack",
                                                      "torchvision_qnnpack", STAT),
        "executorch_int8_vs_fp32": et.get("int8_vs_fp32"),
        # the same pt2e -> XNNPACK path on torchvision's hand-written MobileNetV2: what the CPU allows
        "executorch_torchvision_int8_vs_fp32": et.get("torchvision_int8_vs_fp32"),
        "qat_step_overhead": timer.ratio("qat_step_overhead", "train_step", "qat", "fp32", STAT),
        # our QAT/fp32 step ratio over torchvision's eager QAT/float step ratio (1 = the same relative cost)
        "qat_step_overhead_vs_torchvision": timer.figure("qat_step_overhead_vs_torchvision", ours_qat_overhead / tv_qat_overhead,
                                                         [("train_step", v) for v in step_timing]),
    }
    if et:
        timer.figure("executorch_int8_vs_fp32", result["executorch_int8_vs_fp32"], [("executorch", "ours_int8"), ("executorch", "ours_fp32")])
        timer.figure("executorch_torchvision_int8_vs_fp32", result["executorch_torchvision_int8_vs_fp32"],
                     [("executorch", "torchvision_int8"), ("executorch", "torchvision_fp32")])
    # The slowest x86 int8 form relative to fp32 over every architecture and batch size measured (target < 1).
    pairs = [("mobilenetv2_100", "b1", "x86", result["x86_latency_vs_fp32"])]
    sources = [("mobilenetv2", "ours_x86"), ("mobilenetv2", "fp32_eager")]
    if result["executorch_int8_vs_fp32"] is not None:  # int8 .pte against the fp32 .pte of the same runtime
        pairs.append(("mobilenetv2_100", "b1", "executorch_vs_fp32_pte", result["executorch_int8_vs_fp32"]))
        sources += [("executorch", "ours_int8"), ("executorch", "ours_fp32")]
    for arch, entry in details.get("int8_vs_fp32", {}).items():
        for batch, ratios in entry["ratios"].items():
            forms = [form for form in ratios if form in X86_INT8_FORMS]
            pairs += [(arch, batch, form, ratios[form]) for form in forms]
            sources += [(f"int8_vs_fp32/{arch}/{batch}", v) for v in ["fp32_eager", *forms]]
    worst = max(pairs, key=lambda p: p[3])
    # every pair considered counts: a noisy one could have hidden the true worst case
    result["worst_int8_vs_fp32"] = timer.figure("worst_int8_vs_fp32", worst[3], sources)
    details["worst_int8_vs_fp32"] = {"arch": worst[0], "batch": worst[1], "form": worst[2], "ratio": worst[3]}
    result["cpu"] = cpu_capability()
    details["targets_met"] = {k: (result[k] is not None and result[k] <= t) for k, t in TARGETS.items()}
    write_bench("quantization", details, result, out_dir=args.out, timings=timer)
    return result
