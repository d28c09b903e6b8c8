"""Pruning benchmark: ``python -m lightning_eff.bench pruning [--quick] [--table1]``.

Measures, in one process with a fixed thread count:

(a) **step-time overhead** of pruning during training, on MobileNetV2 width 0.5, 1×32×32 inputs,
    batch 64: a plain step, a step with our masks at 75% (gradient masking before, weight masking
    after the optimizer step, plus one global mask update amortized every 50 steps as in the
    recipe), and a step with the reparametrization Lightning's ``ModelPruning`` applies
    (``torch.nn.utils.prune``: a forward pre-hook recomputes ``weight_orig * weight_mask``), the
    three (and the mask update itself) *interleaved* by the one timer
    (:func:`lightning_eff.measure.time_interleaved`) so that a neighbour process slows them alike;
    ratios of the medians. ``--lightning-runs`` adds whole interleaved ``Trainer.fit`` runs of the
    three callbacks (same model and data, per-step time = fit time / steps), which include
    Lightning's own per-step cost but are noisy on shared CPUs;
(b) **structured 50%**: MobileNetV2 (width 1.0, 3×224×224) with half of *every* prunable channel
    group removed (:func:`prune_channels`): the blocks' expansion channels, the head, and the
    residual streams between blocks (stem, each stage's output, coupled through the skip adds);
    CPU latency at batch 1 and 32 relative to dense (timed interleaved; ratio of the minimum times,
    medians and spreads in the JSON), in eager mode, as the TorchScript ``.pt`` our ``Export`` writes, loaded
    back from disk (``structured50_exported_b*``), and as TorchScript at its fastest in-process
    (traced, frozen: BN folded, ``optimize_for_inference``; ``structured50_deployed_b*``), and as the
    ExecuTorch ``.pte`` (XNNPACK delegate) our ``export_executorch`` writes, loaded back and run by the
    ExecuTorch runtime — the maintained deployment path (``structured50_executorch_b*``; skipped when
    the ``export`` extra is not installed). The expansion-only variant (streams kept whole) is measured
    beside it in eager mode;
(c) **sparse artifact**: bytes of the bitmask artifact of a 90%-sparse MobileNetV2 (width 1.0,
    global magnitude) relative to the dense ``torch.save`` state_dict; also int8 values, gzip, and
    the latency of the 90%-sparse model relative to dense (unstructured sparsity buys none on CPU).

``--table1`` adds the survey's Table 1 analog on Fashion-MNIST: test accuracy at 0/50/75/90%
unstructured (polynomial schedule) and 50% channels, ours vs ``ModelPruning`` at the same final
sparsity and budget (``--epochs``, ``--train-examples``). Expensive: run it on an idle machine.

Final line: ``RESULT step_overhead=<r> overhead_vs_modelpruning=<r> structured50_latency_b1=<r>
structured50_latency_b32=<r> structured50_exported_b1=<r> structured50_exported_b32=<r> structured50_deployed_b1=<r>
structured50_deployed_b32=<r> sparse90_bytes=<r> [structured50_executorch_b1=<r> structured50_executorch_b32=<r>]
noisy=<0|1>``; ``noisy=1`` when a timed figure came from rounds that disagree (the JSON's ``timings`` names them).
"""
from __future__ import annotations

import copy
import functools
import io
import itertools
import os
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eff.bench.common import Timings, bench_parser, set_threads, write_bench
from lightning_eff.callbacks.pruning import Pruning
from lightning_eff.compression.pruning import prune, prune_channels, sparse_state_dict
from lightning_eff.compression.pruning.sparse_format import serialize_sparse
from lightning_eff.errors import ConfigError, ExportUnavailableError
from lightning_eff.measure import (
    count_macs,
    count_parameters,
    gzip_size,
)
from lightning_eff.models import create_model
from lightning_eff.schedules import polynomial_decay

SMALL = dict(width=0.5, num_classes=10, in_chans=1, small_input_stages=1)
LARGE = dict(width=1.0, num_classes=1000, in_chans=3, small_input_stages=0)


class _Task(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float = 0.05):
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-5)


def _model_pruning(amounts_per_epoch: list[float], model: nn.Module, structured: bool = False) -> L.Callback:
    """Lightning's ModelPruning with cumulative targets per epoch (its amount prunes the *remaining* weights).

    It prunes the same tensors as ours: conv/linear weights except the stem (unstructured), or the
    filters of the blocks' ``conv_pw`` and of ``conv_head`` (structured, ``ln_structured`` L1, dim 0).
    """
    from lightning.pytorch.callbacks import ModelPruning

    increments = []
    prev = 0.0
    for target in amounts_per_epoch:
        increments.append(0.0 if target <= prev else (target - prev) / (1.0 - prev))
        prev = max(prev, target)
    if structured:
        params = [(m, "weight") for n, m in model.named_modules() if n.endswith("conv_pw") and n.startswith("blocks") or n == "conv_head"]
        return ModelPruning("ln_structured", parameters_to_prune=params, amount=lambda epoch: increments[min(epoch, len(increments) - 1)],
                            pruning_dim=0, pruning_norm=1, use_global_unstructured=False,
                            use_lottery_ticket_hypothesis=False, verbose=0)
    params = [(m, "weight") for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "conv_stem"]
    return ModelPruning("l1_unstructured", parameters_to_prune=params, amount=lambda epoch: increments[min(epoch, len(increments) - 1)],
                        use_global_unstructured=True, use_lottery_ticket_hypothesis=False, verbose=0)


def _fit(model: nn.Module, loader: DataLoader, callbacks: list, epochs: int, limit: int | None = None) -> None:
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=limit, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(_Task(model), loader)


def step_overhead(steps: int, repeats: int, timer: Timings, batch: int = 64) -> dict[str, Any]:
    """(a) with Lightning: mean step time of plain / Pruning / ModelPruning fits, the fits interleaved.

    Each variant is a whole ``Trainer.fit`` (a fresh network, same data, 2 epochs) timed by the one
    interleaved timer (timing ``"lightning_runs"``: one untimed fit each, then ``repeats`` rounds),
    at two lengths: ``steps // 2`` steps per epoch and 1 step per epoch (``<variant>_short``). The
    step time is the difference of the two fastest fits over the difference in steps, so the
    Trainer's setup (seconds, the same in both) cancels, and the steps' Lightning cost, the mask
    updates and ModelPruning's epoch-end pruning beyond those of the short fit stay in.

    Raises:
        ConfigError: ``steps < 4`` (the long fit needs at least 2 steps per epoch).
    """
    if steps < 4:
        raise ConfigError(f"--steps={steps}: --lightning-runs needs at least 4 (2 epochs of at least 2 steps).")
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(batch * steps, 1, 32, 32, generator=g), torch.randint(0, 10, (batch * steps,), generator=g))
    loader = DataLoader(data, batch_size=batch)
    epochs, per_epoch, short = 2, steps // 2, 1

    def fit(variant: str, per_epoch: int) -> None:
        torch.manual_seed(0)
        model = create_model("mobilenetv2", **SMALL)
        cbs: list = []
        if variant == "pruning":
            cbs = [Pruning(amount=0.75, schedule="polynomial", frequency=max(1, steps // 4), end_fraction=0.75, export_sparse=None)]
        elif variant == "model_pruning":
            cbs = [_model_pruning([0.6, 0.75], model)]
        _fit(model, loader, cbs, epochs, per_epoch)

    variants = ("plain", "pruning", "model_pruning")
    fits = {}
    for k in variants:
        fits[k] = functools.partial(fit, k, per_epoch)
        fits[f"{k}_short"] = functools.partial(fit, k, short)
    timing = timer.time("lightning_runs", fits, rounds=repeats, repeats=1, warmup=1)
    mean = {k: (timing[k].min_ms - timing[f"{k}_short"].min_ms) / (epochs * (per_epoch - short)) for k in variants}
    return {"step_ms": mean, "fit_ms": timing.rows(), "steps": epochs * per_epoch, "short_steps": epochs * short, "batch": batch,
            "repeats": repeats,
            "pruning_settings": f"polynomial to 0.75, mask update every {max(1, steps // 4)} steps, logging on (amortized in the mean)",
            "model_pruning_settings": "l1_unstructured, global over conv/linear weights but the stem, pruned at both epoch "
                                      "ends (0.6 then 0.75), no lottery ticket",
            "step_overhead": mean["pruning"] / mean["plain"], "model_pruning_overhead": mean["model_pruning"] / mean["plain"],
            "overhead_vs_modelpruning": mean["pruning"] / mean["model_pruning"]}


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, pruner=None, step: int = 0) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    if pruner is not None:
        pruner.before_optimizer_step(step, [opt])
    opt.step()
    if pruner is not None:
        pruner.after_optimizer_step()


def _schedule(calls: int) -> tuple[int, int]:
    """``(rounds, timed calls per round)`` for about ``calls`` timed calls: 5 rounds up to 15 calls, 10 above."""
    rounds = min(calls, 5 if calls <= 15 else 10)
    return rounds, max(1, calls // rounds)


def step_overhead_alternating(steps: int, timer: Timings, batch: int = 64, frequency: int = 50, amount: float = 0.75) -> dict[str, Any]:
    """(a), robust form: plain / ours / ``torch.nn.utils.prune`` steps *interleaved* by the one timer.

    Three copies of the same network train on the same batch: plain; with our :class:`Pruner`
    (masks at ``amount``, gradient masking before and weight masking after every step); and with
    the reparametrization Lightning's ``ModelPruning`` installs (``prune.global_unstructured`` with
    L1: ``weight = weight_orig * weight_mask`` recomputed by a forward pre-hook at every forward).
    Interleaving (timing ``"step_overhead"``: about ``steps`` timed steps per variant, in rounds,
    after two untimed ones) makes a neighbour process slow all three alike. Our mask update cost
    (one global re-ranking, timed in the same rounds) is amortized at the recipe's ``frequency``;
    ModelPruning's epoch-end pruning (once per ~430 steps on Fashion-MNIST) is not charged to it.
    """
    from torch.nn.utils import prune as torch_prune

    from lightning_eff.compression.pruning import Pruner, PruningConfig

    torch.manual_seed(0)
    base = create_model("mobilenetv2", **SMALL)
    models = {k: copy.deepcopy(base) for k in ("plain", "pruning", "model_pruning")}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5) for k, m in models.items()}
    pruner = Pruner(PruningConfig(amount=amount, schedule="constant", exclude=["conv_stem"]))
    pruner.attach(models["pruning"], total_steps=steps)
    pruner.update(amount, [opts["pruning"]])
    targets = [(m, "weight") for n, m in models["model_pruning"].named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != "conv_stem"]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=amount)
    opts["model_pruning"] = torch.optim.SGD(models["model_pruning"].parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    counter = itertools.count()
    calls = {k: (lambda k=k: _train_step(models[k], opts[k], x, y, pruner if k == "pruning" else None, next(counter)))
             for k in models}
    calls["mask_update"] = lambda: pruner.update(amount, [opts["pruning"]])
    rounds, per_round = _schedule(steps)
    timing = timer.time("step_overhead", calls, rounds=rounds, repeats=per_round, warmup=2)
    med = timing.stat("median_ms")
    ours = med["pruning"] + med["mask_update"] / frequency
    sources = {"step_overhead": ["pruning", "mask_update", "plain"], "overhead_vs_modelpruning": ["pruning", "mask_update", "model_pruning"]}
    return {"step_ms_median": {k: med[k] for k in models}, "timing": timing.rows(), "mask_update_ms": med["mask_update"],
            "frequency": frequency, "batch": batch, "steps": rounds * per_round, "ours_amortized_ms": ours,
            "step_overhead": ours / med["plain"], "model_pruning_overhead": med["model_pruning"] / med["plain"],
            "overhead_vs_modelpruning": ours / med["model_pruning"], "sources": sources}


def paired_latency(timer: Timings, label: str, models: dict[str, nn.Module], x: torch.Tensor, warmup: int,
                   repeats: int) -> dict[str, dict[str, Any]]:
    """``{name: timing row}`` (``min_ms``, ``median_ms``, ``spread``, ``noisy``...), the models timed interleaved.

    Through the one timer (stored in ``timer`` under ``label``; about ``repeats`` timed calls per
    model, in rounds). Interleaving makes a neighbour's burst hit every variant alike. On a shared
    machine the *minimum* is the better estimate of a model's own cost (contention only ever adds
    time), so ratios use it; the medians are kept beside it.
    """
    rounds, per_round = _schedule(repeats)
    return timer.time_models(label, models, x, rounds=rounds, repeats=per_round, warmup=warmup).rows()


def deployed(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    """TorchScript at its fastest in-process: traced, frozen (Conv–BN folded) and ``optimize_for_inference``.

    (Measured, not shipped: an ``optimize_for_inference`` module does not load back after
    ``torch.jit.save`` on this torch — "required keyword attribute 'value' is undefined".)
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but is the requested target
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model.eval(), x)))


def exported(model: nn.Module, x: torch.Tensor, folder: str) -> torch.jit.ScriptModule:
    """The artifact a user ships: written by our ``export_torchscript`` (``Export(formats=["pt"])``), loaded back."""
    from lightning_eff.export import export_torchscript

    path = os.path.join(folder, f"{id(model)}.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_torchscript(model.eval(), x, path)
        return torch.jit.load(path)


def executorch_program(model: nn.Module, x: torch.Tensor, folder: str) -> Any:
    """The maintained deployment path: our ``export_executorch`` (XNNPACK delegate) ``.pte``, loaded back
    and run by the ExecuTorch runtime (static shapes: one program per batch size)."""
    from lightning_eff.export import export_executorch, load_artifact

    path = os.path.join(folder, f"{id(model)}_{x.shape[0]}.pte")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_executorch(model.eval(), x, path)
    return load_artifact(path)


def structured_latency(quick: bool, timer: Timings) -> dict[str, Any]:
    """(b): dense vs 50%-channel MobileNetV2 at 224×224 (plus the 32×32 training configuration).

    Timings are stored in ``timer`` as ``structured50/<config>/b<batch>/<eager|deployed|exported|executorch>``.
    """
    out: dict[str, Any] = {}
    for label, kwargs, res in (("mnv2_w1.0_224", LARGE, 224), ("mnv2_w0.5_32", SMALL, 32)):
        torch.manual_seed(0)
        dense = create_model("mobilenetv2", **kwargs).eval()
        small = prune_channels(dense, 0.5)
        blocks_only = prune_channels(dense, 0.5, streams=False)
        x1 = torch.randn(1, kwargs["in_chans"], res, res)
        row: dict[str, Any] = {"params_dense": count_parameters(dense), "params_pruned": count_parameters(small),
                               "params_expansion_only": count_parameters(blocks_only), "macs_dense": count_macs(dense, x1),
                               "macs_pruned": count_macs(small, x1), "macs_expansion_only": count_macs(blocks_only, x1)}
        for b in (1, 32):
            x = torch.randn(b, kwargs["in_chans"], res, res)
            reps = (3 if b == 32 else 15) if quick else (10 if b == 32 else 50)
            key = f"structured50/{label}/b{b}"
            ms = paired_latency(timer, f"{key}/eager", {"dense": dense, "pruned": small, "expansion_only": blocks_only}, x,
                                warmup=1 if b == 32 else 3, repeats=reps)
            row[f"dense_ms_b{b}"], row[f"pruned_ms_b{b}"] = ms["dense"], ms["pruned"]
            row[f"expansion_only_ms_b{b}"] = ms["expansion_only"]
            row[f"ratio_b{b}"] = ms["pruned"]["min_ms"] / ms["dense"]["min_ms"]
            row[f"median_ratio_b{b}"] = ms["pruned"]["median_ms"] / ms["dense"]["median_ms"]
            row[f"expansion_only_ratio_b{b}"] = ms["expansion_only"]["min_ms"] / ms["dense"]["min_ms"]
            # eager fp32 pays a fixed per-operator cost (about half of the dense batch-1 time at 224²) that
            # removing channels cannot reduce; the deployed TorchScript graph (BN folded, ops fused) does not
            # (TorchScript's profiling executor optimizes the graph over the first calls: warm up longer)
            js = paired_latency(timer, f"{key}/deployed", {"dense": deployed(dense, x), "pruned": deployed(small, x)}, x,
                                warmup=3 if b == 32 else 10, repeats=reps)
            row[f"deployed_dense_ms_b{b}"], row[f"deployed_pruned_ms_b{b}"] = js["dense"], js["pruned"]
            row[f"deployed_ratio_b{b}"] = js["pruned"]["min_ms"] / js["dense"]["min_ms"]
            with tempfile.TemporaryDirectory() as folder:
                ex = paired_latency(timer, f"{key}/exported", {"dense": exported(dense, x, folder), "pruned": exported(small, x, folder)},
                                    x, warmup=3 if b == 32 else 10, repeats=reps)
            row[f"exported_dense_ms_b{b}"], row[f"exported_pruned_ms_b{b}"] = ex["dense"], ex["pruned"]
            row[f"exported_ratio_b{b}"] = ex["pruned"]["min_ms"] / ex["dense"]["min_ms"]
            try:
                with tempfile.TemporaryDirectory() as folder:
                    programs = {"dense": executorch_program(dense, x, folder), "pruned": executorch_program(small, x, folder)}
                    et = paired_latency(timer, f"{key}/executorch", programs, x, warmup=2 if b == 32 else 5, repeats=reps)
            except ExportUnavailableError as err:  # executorch is the optional `export` extra
                row["executorch_unavailable"] = str(err)
                continue
            row[f"executorch_dense_ms_b{b}"], row[f"executorch_pruned_ms_b{b}"] = et["dense"], et["pruned"]
            row[f"executorch_ratio_b{b}"] = et["pruned"]["min_ms"] / et["dense"]["min_ms"]
        out[label] = row
    return out


def sparse_artifact(quick: bool, timer: Timings) -> dict[str, Any]:
    """(c): bytes of the 90%-sparse artifact vs dense, and whether the sparsity bought latency (timing ``sparse90/b1``)."""
    torch.manual_seed(0)
    model = create_model("mobilenetv2", **LARGE).eval()
    dense_model = copy.deepcopy(model)
    prune(model, 0.9)
    state = model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    dense = buffer.getvalue()
    row: dict[str, Any] = {"dense_bytes": len(dense), "dense_gzip_bytes": gzip_size(dense)}
    for values in ("fp32", "int8"):
        blob = serialize_sparse(sparse_state_dict(state, values))
        row[f"sparse_{values}_bytes"], row[f"sparse_{values}_gzip_bytes"] = len(blob), gzip_size(blob)
        row[f"ratio_{values}"] = len(blob) / len(dense)
    ms = paired_latency(timer, "sparse90/b1", {"dense": dense_model, "sparse90": model}, torch.randn(1, 3, 224, 224), warmup=3,
                        repeats=15 if quick else 50)
    row["dense_latency_ms_b1"], row["sparse90_latency_ms_b1"] = ms["dense"], ms["sparse90"]
    row["latency_ratio_b1"] = ms["sparse90"]["min_ms"] / ms["dense"]["min_ms"]
    row["median_latency_ratio_b1"] = ms["sparse90"]["median_ms"] / ms["dense"]["median_ms"]
    row["latency_gain"] = row["latency_ratio_b1"] < 0.9
    row["latency_note"] = ("unstructured 90% sparsity buys no CPU speed-up: fp32 eager runs dense oneDNN/MKL kernels that "
                           "multiply the zeros (and the x86/QNNPACK int8 kernels are dense too); the gain is storage only")
    return row


def table1_variants(only: list[str] | None = None) -> list[tuple[str, float, str, dict[str, Any]]]:
    """The Table 1 rows to run, ``(name, sparsity, kind, options)``; all of them, or those named in ``only``.

    Besides the standard rows, ``ours_unstructured_<pct>[_<erk|uniform|global>][_beginNN][_endNN][_updatesK]`` runs
    our unstructured pruning with another distribution, schedule begin / end (NN% of training) and / or
    number of mask updates K.

    Raises:
        ConfigError: an unknown row or row option, before anything trains.
    """
    variants: list[tuple[str, float, str]] = [("dense", 0.0, "none")]
    for s in (0.5, 0.75, 0.9):
        variants += [(f"ours_unstructured_{int(s * 100)}", s, "ours"), (f"modelpruning_unstructured_{int(s * 100)}", s, "lightning")]
    variants += [("ours_channels_50", 0.5, "ours_channels"), ("modelpruning_ln_structured_50", 0.5, "lightning_structured")]
    known = {v[0] for v in variants}
    for extra in only or []:
        parts = extra.split("_")
        if extra not in known and extra.startswith("ours_unstructured_") and len(parts) >= 4 and parts[2].isdigit():
            variants.append((extra, int(parts[2]) / 100.0, "ours"))
    unknown = sorted(set(only or []) - {v[0] for v in variants})
    if unknown:
        raise ConfigError(f"--table1-rows: unknown rows {unknown}; rows are {[v[0] for v in variants]} "
                          "(plus ours_unstructured_<pct>_<erk|uniform|global|beginNN|endNN|updatesK>).")
    chosen = []
    for name, sparsity, kind in variants:
        if only and name not in only:
            continue
        options: dict[str, Any] = {"distribution": "global", "begin_fraction": 0.0, "end_fraction": 0.75, "updates": None}
        for part in name.split("_")[3:] if kind == "ours" else []:
            if part in ("erk", "uniform", "global"):
                options["distribution"] = part
            elif part.startswith("end") and part[3:].isdigit() and 0 < int(part[3:]) <= 100:
                options["end_fraction"] = int(part[3:]) / 100.0
            elif part.startswith("begin") and part[5:].isdigit() and 0 <= int(part[5:]) < 100:
                options["begin_fraction"] = int(part[5:]) / 100.0
            elif part.startswith("updates") and part[7:].isdigit() and int(part[7:]) > 0:
                options["updates"] = int(part[7:])
            else:
                raise ConfigError(f"--table1-rows {name!r}: unknown option {part!r}; use erk, uniform, global, "
                                  "beginNN (NN in 0..99), endNN (NN in 1..100) or updatesK (K ≥ 1).")
        if options["begin_fraction"] >= options["end_fraction"]:
            raise ConfigError(f"--table1-rows {name!r}: begin {options['begin_fraction']} must come before end {options['end_fraction']}.")
        chosen.append((name, sparsity, kind, options))
    return chosen


def table1(epochs: int, train_examples: int | None, test_examples: int | None, threads: int,
           only: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Table 1 analog on Fashion-MNIST: ours vs ModelPruning at the same sparsity and budget (``only``: a subset of rows)."""
    from lightning_eff.data import FashionMNISTDataModule
    from lightning_eff.report import evaluate_accuracy
    from lightning_eff.tasks import ClassificationTask

    rows: dict[str, Any] = {}
    for name, sparsity, kind, options in table1_variants(only):  # every row checked before the first trains
        L.seed_everything(seed, verbose=False)
        dm = FashionMNISTDataModule(batch_size=128, resize=32, augment=False, limit_train=train_examples, limit_test=test_examples)
        task = ClassificationTask(dict(name="mobilenetv2", **SMALL), lr=0.1, weight_decay=5e-5, scheduler="onecycle")
        dm.setup("fit")
        steps = epochs * len(dm.train_dataloader())
        cbs: list = []
        if kind == "ours":
            # default: a mask update every steps // 40 (the figures in the README); updatesK spreads K over the schedule
            every = (options["end_fraction"] - options["begin_fraction"]) * steps / options["updates"] if options["updates"] else steps / 40
            cbs = [Pruning(amount=sparsity, schedule="polynomial", begin_fraction=options["begin_fraction"] or None,
                           end_fraction=options["end_fraction"], frequency=max(1, int(every)),
                           distribution=options["distribution"], exclude=["conv_stem"], export_sparse=None, log_sparsity=False)]
        elif kind == "ours_channels":
            cbs = [Pruning(amount=sparsity, schedule="polynomial", end_fraction=0.75, frequency=max(1, steps // 40),
                           granularity="channel", distribution="uniform", include=[r"blocks\..*\.conv_pw", "conv_head"],
                           export_sparse=None, log_sparsity=False, compact_during_fit=True)]
        elif kind.startswith("lightning"):
            per_epoch = [polynomial_decay(int(round((e + 1) / epochs * steps)), 0.0, sparsity, 0, max(1, int(0.75 * steps)))
                         for e in range(epochs)]
            cbs = [_model_pruning(per_epoch, task.model, structured=kind == "lightning_structured")]
        started = time.perf_counter()
        trainer = L.Trainer(max_epochs=epochs, callbacks=cbs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0, limit_val_batches=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(task, datamodule=dm)
        dm.setup("test")
        model = task.model.eval()
        if kind == "ours_channels":
            model = cbs[0].finalize(task)
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        rows[name] = {"test_acc": evaluate_accuracy(model, dm.test_dataloader()), "target_sparsity": sparsity,
                      "conv_linear_zero_fraction": zeros, "params": count_parameters(model), "train_s": time.perf_counter() - started}
        print(f"table1 {name}: acc={rows[name]['test_acc']:.4f} zeros={zeros:.3f} params={rows[name]['params']}", flush=True)
    return {"epochs": epochs, "train_examples": train_examples, "test_examples": test_examples, "seed": seed, "rows": rows}


def main(argv: list[str]) -> dict[str, Any]:
    """Run the benchmark; returns the ``RESULT`` figures (also in ``<out>/pruning.json``)."""
    parser = bench_parser("pruning", __doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per variant (default 20 quick, 60 full)")
    parser.add_argument("--repeats", type=int, default=None, help="--lightning-runs: interleaved fits per variant (default 3 quick, 5 full)")
    parser.add_argument("--lightning-runs", action="store_true",
                        help="also time whole Lightning fits (plain / Pruning / ModelPruning, interleaved; noisy on shared CPUs)")
    parser.add_argument("--table1", action="store_true", help="also train the Table 1 analog on Fashion-MNIST (slow)")
    parser.add_argument("--table1-only", action="store_true", help="only the Table 1 runs (writes pruning_table1.json)")
    parser.add_argument("--table1-rows", nargs="+", default=None, help="Table 1: run only these rows (names as in the JSON)")
    parser.add_argument("--epochs", type=int, default=4, help="Table 1: epochs per run (default 4)")
    parser.add_argument("--train-examples", type=int, default=None, help="Table 1: limit the training set (default all 55k)")
    parser.add_argument("--test-examples", type=int, default=None, help="Table 1: limit the test set (default all 10k)")
    parser.add_argument("--seed", type=int, default=0, help="Table 1: seed of every run (initialization, data order)")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    steps = args.steps or (20 if args.quick else 60)
    repeats = args.repeats or (3 if args.quick else 5)
    logging_off()
    if args.table1_only:
        rows = table1(args.epochs, args.train_examples, args.test_examples, threads, args.table1_rows, args.seed)
        dense = rows["rows"].get("dense", {}).get("test_acc")
        result = {f"{k}_acc": v["test_acc"] for k, v in rows["rows"].items()}
        if dense is not None:
            result.update({f"{k}_drop_pts": 100.0 * (dense - v["test_acc"]) for k, v in rows["rows"].items() if k != "dense"})
        write_bench("pruning_table1", rows, result, args.out)
        return result
    timer = Timings()
    overhead = step_overhead_alternating(steps, timer)
    structured = structured_latency(args.quick, timer)
    artifact = sparse_artifact(args.quick, timer)
    payload: dict[str, Any] = {"overhead": overhead, "structured50": structured, "sparse90": artifact, "quick": args.quick}
    if args.lightning_runs:
        payload["lightning_runs"] = step_overhead(steps, repeats, timer)
    if args.table1:
        payload["table1"] = table1(args.epochs, args.train_examples, args.test_examples, threads, args.table1_rows, args.seed)
    big = structured["mnv2_w1.0_224"]
    result = {
        "step_overhead": overhead["step_overhead"],
        "overhead_vs_modelpruning": overhead["overhead_vs_modelpruning"],
        "structured50_latency_b1": big["ratio_b1"],
        "structured50_latency_b32": big["ratio_b32"],
        "structured50_exported_b1": big["exported_ratio_b1"],
        "structured50_exported_b32": big["exported_ratio_b32"],
        "structured50_deployed_b1": big["deployed_ratio_b1"],
        "structured50_deployed_b32": big["deployed_ratio_b32"],
        "sparse90_bytes": artifact["ratio_fp32"],
    }
    if "executorch_ratio_b1" in big:  # the `export` extra installed
        result.update(structured50_executorch_b1=big["executorch_ratio_b1"], structured50_executorch_b32=big["executorch_ratio_b32"])
    for key, variants in overhead["sources"].items():
        timer.figure(key, result[key], [("step_overhead", v) for v in variants])
    for b in (1, 32):
        for key, form in ((f"structured50_latency_b{b}", "eager"), (f"structured50_exported_b{b}", "exported"),
                          (f"structured50_deployed_b{b}", "deployed"), (f"structured50_executorch_b{b}", "executorch")):
            if key in result:
                label = f"structured50/mnv2_w1.0_224/b{b}/{form}"
                timer.figure(key, result[key], [(label, "pruned"), (label, "dense")])
    write_bench("pruning", payload, result, args.out, timings=timer)
    return result


def logging_off() -> None:
    """Silence Lightning's per-fit banners (dozens of short fits)."""
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning_eff"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
