"""Training efficiency, side by side: ``python -m lightning_eff.bench training_efficiency [--quick]``.

What each switch of issue 16 buys on this CPU, every figure a ratio to its own baseline measured in
the same process by the one interleaved timer (:func:`lightning_eff.measure.time_interleaved`):

- **activation checkpointing** (:func:`~lightning_eff.training.checkpointing.apply_activation_checkpointing`,
  ``auto`` blocks chosen for ``memory_budget=0.45``; every block beside it in the JSON) on MobileNetV2 at Fashion-MNIST size (32 px, batch 128, the recipe's model), MobileNetV2 at
  224x224 (batch 8) and the BERT student (2 layers x 256, 64 tokens, batch 32): bytes saved for backward
  (:func:`~lightning_eff.measure.saved_activation_bytes`) and training-step time, each vs the same net without;
- **bf16-mixed** vs fp32: step time (``torch.autocast("cpu", bfloat16)``, what Lightning's ``bf16-mixed`` runs)
  and the loss difference after the same steps on real Fashion-MNIST batches from the same initialisation; and
  what ``precision=auto`` picks for each of the three networks above (its own measurement,
  :func:`~lightning_eff.training.precision.measure_bf16`: bf16 only where a step is at least 10% faster);
- **DDP**: 2 CPU processes (gloo, 1 thread each) vs 1 process (2 threads) at equal global batch, through
  Lightning's ``ddp_spawn``: training throughput (steps after the first two) and the final loss on a fixed batch;
- **cpu_allocator** (:mod:`~lightning_eff.training.allocator`): the float training step of ``make train``'s
  network (MobileNetV2 w0.5, 32 px, batch 128, channels-last, 2 threads) with glibc's thresholds tuned vs the
  C library's default, in fresh processes (the setting is per process), alternating pairs: median step time
  and page faults per step;
- **torch.compile** (inductor) vs eager training step, **channels-last** vs NCHW inference at 224x224 batch 1,
  and **frozen TorchScript** (``torch.jit.freeze``) vs traced TorchScript at 224x224 batch 1;
- **channels-last BatchNorm backward** (:func:`~lightning_eff.training.layout.nchw_batchnorm_backward`, what
  ``ChannelsLast(batchnorm_backward="auto")`` installs): ``make train``'s channels-last float training step with the
  slow-path BatchNorms' backward in NCHW vs ATen's channels-last kernel everywhere, and the kernel itself
  (one BatchNorm2d forward+backward, 8 and 24 channels at 32x32, batch 128, vs the same tensor in NCHW);
  then the same step with the in-place ReLU6 out of place as well (``inplace_activations="auto"``, vs the step
  above); 2 threads (the slow kernel is a multi-thread effect).

Final line: ``RESULT ckpt_activation_ratio=<r> ckpt_step_time_ratio=<r> bf16_step_time_ratio=<r>
bf16_loss_diff=<x> ddp2_throughput_ratio=<r> compile_step_time_ratio=<r> channels_last_latency_ratio=<r>
frozen_ts_latency_ratio=<r> allocator_step_time_ratio=<r> bn_backward_step_time_ratio=<r>
out_of_place_act_step_time_ratio=<r> noisy=<0|1>`` — the checkpointing figures are the worst of the three models.
The CPU capability (``AVX2``/``AVX512``, AMX) is in the JSON: bf16 only pays where the CPU has bf16 units.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_eff.bench.common import Timings, bench_parser, set_threads, write_bench
from lightning_eff.measure import (
    cpu_capability,
    format_table,
    saved_activation_bytes,
    train_step_fn,
)
from lightning_eff.training.checkpointing import apply_activation_checkpointing
from lightning_eff.training.layout import (
    ChannelsLastInput,
    compile_network,
    to_channels_last,
)
from lightning_eff.training.precision import choose_precision, measure_bf16

log = logging.getLogger(__name__)
#: The ``memory_budget`` the headline checkpointing figures use (the share of saved activations to keep):
#: below the 0.5 target with a margin for the estimate, and far fewer recomputed blocks than "every block".
MEMORY_BUDGET = 0.45


def _models(quick: bool) -> dict[str, tuple[nn.Module, Any, torch.Tensor]]:
    """``{name: (network, inputs, targets)}``: the three networks the checkpointing rows measure."""
    from lightning_eff.models import create_model

    torch.manual_seed(0)
    out: dict[str, tuple[nn.Module, Any, torch.Tensor]] = {}
    b = 64 if quick else 128
    out["mobilenetv2_fmnist"] = (create_model("mobilenetv2", width=0.5, num_classes=10, in_chans=1, small_input_stages=1),
                                 torch.randn(b, 1, 32, 32), torch.randint(0, 10, (b,)))
    b = 4 if quick else 8
    out["mobilenetv2_224"] = (create_model("mobilenetv2", width=1.0, num_classes=10, in_chans=3, small_input_stages=0),
                              torch.randn(b, 3, 224, 224), torch.randint(0, 10, (b,)))
    b, t = (16, 64) if quick else (32, 64)
    out["bert_student"] = (create_model("bert_student", num_classes=26, vocab_size=8000, num_layers=2, hidden=256, heads=4,
                                        max_length=t),
                           {"input_ids": torch.randint(5, 8000, (b, t)), "attention_mask": torch.ones(b, t, dtype=torch.long)},
                           torch.randint(0, 26, (b,)))
    return out


def _checkpointing(timer: Timings, quick: bool, threads: int, memory_budget: float = MEMORY_BUDGET) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    rounds, repeats = (3, 2) if quick else (5, 3)
    for name, (net, inputs, targets) in _models(quick).items():
        plain, every, budget = copy.deepcopy(net).train(), copy.deepcopy(net).train(), copy.deepcopy(net).train()
        info_all = apply_activation_checkpointing(every)
        info = apply_activation_checkpointing(budget, memory_budget=memory_budget, example_inputs=inputs)
        before = saved_activation_bytes(plain, inputs)
        after_all, after = saved_activation_bytes(every, inputs), saved_activation_bytes(budget, inputs)
        timing = timer.time(f"ckpt_{name}", {"plain": train_step_fn(plain, inputs, targets),
                                             "every_block": train_step_fn(every, inputs, targets),
                                             "budget": train_step_fn(budget, inputs, targets)},
                            rounds=rounds, repeats=repeats, warmup=1, threads=threads)
        rows[name] = {"blocks": f"{len(info.modules)}/{len(info_all.modules) if info_all.method == 'wrapper' else 'all'}",
                      "saved_mib": before["saved_mib"], "activation_ratio": after["saved_bytes"] / before["saved_bytes"],
                      "step_time_ratio": timer.ratio(f"ckpt_step_time_ratio_{name}", f"ckpt_{name}", "budget", "plain"),
                      "every_block_method": info_all.method,
                      "every_block_activation_ratio": after_all["saved_bytes"] / before["saved_bytes"],
                      "every_block_step_time_ratio": timer.ratio(f"ckpt_every_step_time_ratio_{name}", f"ckpt_{name}",
                                                                 "every_block", "plain"),
                      "step_ms": timing["plain"].min_ms}
    return rows


def _bf16(timer: Timings, quick: bool, threads: int) -> dict[str, Any]:
    """Step time, and the loss after the same real batches from the same start, fp32 vs bf16 autocast."""
    from lightning_eff.data import FashionMNISTDataModule
    from lightning_eff.models import create_model

    steps = 20 if quick else 60
    dm = FashionMNISTDataModule(batch_size=64, resize=32, limit_train=64 * steps, limit_val=64, limit_test=64)
    dm.setup("fit")
    batches = list(dm.train_dataloader())[:steps]
    torch.manual_seed(0)
    init = create_model("mobilenetv2", width=0.5, num_classes=10, in_chans=1, small_input_stages=1)

    def train(autocast: bool) -> list[float]:
        net = copy.deepcopy(init).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for x, y in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                loss = nn.functional.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    fp32, bf16 = train(False), train(True)
    tail = max(1, steps // 4)
    x, y = batches[0]
    f_step = train_step_fn(copy.deepcopy(init), x, y)
    b_net = copy.deepcopy(init)
    b_inner = train_step_fn(b_net, x, y, loss_fn=lambda out, t: nn.functional.cross_entropy(out.float(), t))

    def b_step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return b_inner()

    timer.time("bf16", {"fp32": f_step, "bf16_mixed": b_step}, rounds=3 if quick else 5, repeats=3, warmup=2, threads=threads)
    auto = {}  # what precision=auto picks for each network on this CPU (it measures only where bf16 hardware exists)
    for name, (net, inputs, _) in _models(quick).items():
        measured = measure_bf16(net, inputs, channels_last=name.startswith("mobilenet"), rounds=3 if quick else 5)
        auto[name] = {**measured, "auto": choose_precision("auto", "cpu", measure=lambda m=measured: m)["resolved"]}
    return {"auto": auto, "steps": steps, "fp32_loss_tail": sum(fp32[-tail:]) / tail, "bf16_loss_tail": sum(bf16[-tail:]) / tail,
            "loss_diff": abs(sum(fp32[-tail:]) - sum(bf16[-tail:])) / tail,
            "step_time_ratio": timer.ratio("bf16_step_time_ratio", "bf16", "bf16_mixed", "fp32")}


class _Clock(L.Callback):
    """Rank 0 writes the time of the steps after ``skip`` and the final loss on a fixed batch to ``path``."""

    def __init__(self, path: str, skip: int, probe: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.path, self.skip, self.probe = path, skip, probe
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if trainer.global_step == self.skip:
            self._start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: D102
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        if trainer.is_global_zero:
            with torch.no_grad():  # batch statistics (a copy in train mode): after a few steps BN's running ones lag
                loss = float(nn.functional.cross_entropy(copy.deepcopy(pl_module.model).train()(self.probe[0]), self.probe[1]))
            Path(self.path).write_text(json.dumps({"elapsed_s": elapsed, "steps": trainer.global_step - self.skip,
                                                   "final_loss": loss, "world_size": trainer.world_size}))


def _ddp_run(devices: int, global_batch: int, steps: int, root: Path) -> dict[str, Any]:
    from lightning_eff.data import FashionMNISTDataModule
    from lightning_eff.models import create_model
    from lightning_eff.tasks import ClassificationTask

    L.seed_everything(0, verbose=False)
    def data() -> FashionMNISTDataModule:
        return FashionMNISTDataModule(batch_size=global_batch // devices, resize=32, limit_train=global_batch * steps,
                                      limit_val=64, limit_test=64)

    probe = data()  # the fixed probe batch comes from a datamodule of its own
    probe.setup("fit")
    probe_x, probe_y = next(iter(probe.val_dataloader()))
    dm = data()
    task = ClassificationTask(create_model("mobilenetv2", width=0.5, num_classes=10, in_chans=1, small_input_stages=1),
                              num_classes=10, lr=0.05, scheduler="cosine")
    path = root / f"ddp{devices}.json"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[_Clock(str(path), 2, (probe_x, probe_y))], default_root_dir=str(root))
    threads = torch.get_num_threads()
    if devices > 1:
        torch.set_num_threads(1)  # each rank one core: the two-process run uses the same two cores as the baseline
    try:
        trainer.fit(task, datamodule=dm)
    finally:
        torch.set_num_threads(threads)
    out = json.loads(path.read_text())
    out["throughput"] = out["steps"] * global_batch / out["elapsed_s"]
    return out


def _ddp(quick: bool) -> dict[str, Any]:
    steps = 8 if quick else 30
    root = Path(tempfile.mkdtemp(prefix="bench_ddp_"))
    torch.set_num_threads(2)
    one = _ddp_run(1, 128, steps, root)
    two = _ddp_run(2, 128, steps, root)
    return {"steps": steps, "global_batch": 128, "one_process": one, "two_processes": two,
            "throughput_ratio": two["throughput"] / one["throughput"],
            "final_loss_diff": abs(two["final_loss"] - one["final_loss"])}


_ALLOC_STEP = """
import json, sys, time, torch
from torch import nn
from lightning_eff.training.allocator import page_faults, resolve_cpu_allocator
applied = resolve_cpu_allocator(sys.argv[1])["applied"]
from lightning_eff.models import create_model
torch.set_num_threads(int(sys.argv[3]))
torch.manual_seed(0)
net = create_model("mobilenetv2", width=0.5, small_input_stages=1, num_classes=10, in_chans=1).to(memory_format=torch.channels_last)
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(128, 1, 32, 32).to(memory_format=torch.channels_last)
y = torch.randint(0, 10, (128,))
def step():  # Lightning's order (zero_grad, forward, backward, step), not train_step_fn's (zero_grad after the forward):
    opt.zero_grad(set_to_none=True)  # glibc's faults depend on it (45k vs 4.5k per step by default, measured)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
for _ in range(3):
    step()
steps, faults, start = int(sys.argv[2]), page_faults(), time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"applied": applied, "step_ms": (time.perf_counter() - start) / steps * 1e3,
                  "faults_per_step": (page_faults() - faults) / steps}))
"""


def _allocator(quick: bool) -> dict[str, Any]:
    import statistics
    import subprocess
    import sys

    pairs, steps, threads = (3, 10, 2) if quick else (6, 30, 2)
    runs: dict[str, list[dict[str, Any]]] = {"default": [], "auto": []}
    for _ in range(pairs):  # alternating, so drift on a shared machine hits both sides
        for mode in runs:
            out = subprocess.run([sys.executable, "-c", _ALLOC_STEP, mode, str(steps), str(threads)], capture_output=True,
                                 text=True, check=True, timeout=600)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {m: statistics.median(r["step_ms"] for r in rs) for m, rs in runs.items()}
    faults = {m: statistics.median(r["faults_per_step"] for r in rs) for m, rs in runs.items()}
    pair_ratios = [a["step_ms"] / d["step_ms"] for d, a in zip(runs["default"], runs["auto"])]
    return {"pairs": pairs, "steps": steps, "threads": threads, "runs": runs, "applied": runs["auto"][0]["applied"],
            "step_ms_default": med["default"], "step_ms_tuned": med["auto"],
            "faults_per_step_default": faults["default"], "faults_per_step_tuned": faults["auto"],
            "pair_ratios": pair_ratios, "pairs_faster": sum(r < 1.0 for r in pair_ratios),
            "step_time_ratio": med["auto"] / med["default"]}


def _compile_and_layout(timer: Timings, quick: bool, threads: int) -> dict[str, Any]:
    from lightning_eff.models import create_model

    torch.manual_seed(0)
    net = create_model("mobilenetv2", width=0.5, num_classes=10, in_chans=1, small_input_stages=1)
    b = 32 if quick else 128
    x, y = torch.randn(b, 1, 32, 32), torch.randint(0, 10, (b,))
    eager, compiled = copy.deepcopy(net), compile_network(copy.deepcopy(net), backend="inductor")
    start = time.perf_counter()
    compiled_step = train_step_fn(compiled, x, y)
    compiled_step()  # the first call compiles forward and backward
    compile_s = time.perf_counter() - start
    timer.time("compile_step", {"eager": train_step_fn(eager, x, y), "compiled": compiled_step},
               rounds=3 if quick else 5, repeats=3, warmup=1, threads=threads)

    big = create_model("mobilenetv2", width=1.0, num_classes=10, in_chans=3, small_input_stages=0).eval()
    x224 = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(big), x224)
        frozen = torch.jit.freeze(torch.jit.trace(copy.deepcopy(big), x224).eval())
        frozen_cl = torch.jit.freeze(torch.jit.trace(ChannelsLastInput(copy.deepcopy(big)).eval(), x224).eval())
    models = {"nchw": big, "channels_last": ChannelsLastInput(copy.deepcopy(big)).eval(), "ts_traced": traced,
              "ts_frozen": frozen, "ts_frozen_channels_last": frozen_cl}
    rounds, repeats = (4, 3) if quick else (8, 5)
    timer.time_models("infer_224_b1", models, x224, rounds=rounds, repeats=repeats, warmup=3, threads=threads)
    return {"compile_first_step_s": compile_s,
            "compile_step_time_ratio": timer.ratio("compile_step_time_ratio", "compile_step", "compiled", "eager"),
            "channels_last_latency_ratio": timer.ratio("channels_last_latency_ratio", "infer_224_b1", "channels_last", "nchw"),
            "frozen_ts_latency_ratio": timer.ratio("frozen_ts_latency_ratio", "infer_224_b1", "ts_frozen", "ts_traced"),
            "frozen_cl_ts_latency_ratio": timer.ratio("frozen_cl_ts_latency_ratio", "infer_224_b1", "ts_frozen_channels_last",
                                                      "ts_traced")}


def _batchnorm_backward(timer: Timings, quick: bool, threads: int) -> dict[str, Any]:
    """``make train``'s channels-last float step, BatchNorm backward rerouted (``auto``) vs ATen's kernel (``native``).

    At least 2 threads (``make train``'s setting): the slow kernel is a multi-thread effect (one thread: no reroute).
    """
    from lightning_eff.models import create_model

    threads = max(threads, 2)
    b = 32 if quick else 128
    x, y = torch.randn(b, 1, 32, 32), torch.randint(0, 10, (b,))
    steps = {}
    for name, bn, acts in (("native", "native", "keep"), ("auto", "auto", "keep"), ("auto_out_of_place", "auto", "auto")):
        torch.manual_seed(0)
        net = create_model("mobilenetv2", width=0.5, num_classes=10, in_chans=1, small_input_stages=1)
        to_channels_last(net, batchnorm_backward=bn, inplace_activations=acts)
        steps[name] = train_step_fn(net, x, y)
    rounds, repeats = (3, 3) if quick else (6, 4)
    timer.time("bn_backward_step", steps, rounds=rounds, repeats=repeats, warmup=1, threads=threads)
    kernels: dict[str, Any] = {}
    for c in (8, 24):
        bn = nn.BatchNorm2d(c)
        t = torch.randn(b, c, 32, 32)
        grad = torch.randn(b, c, 32, 32)
        fns = {}
        for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xin = t.to(memory_format=fmt).requires_grad_()
            g = grad.to(memory_format=fmt)
            fns[layout] = (lambda xin=xin, g=g, bn=bn: torch.autograd.grad(bn(xin), xin, g))
        cl_net = nn.Sequential(nn.BatchNorm2d(c))
        to_channels_last(cl_net, inputs=False)
        xin = t.to(memory_format=torch.channels_last).requires_grad_()
        g = grad.to(memory_format=torch.channels_last)
        fns["channels_last_rerouted"] = lambda xin=xin, g=g, m=cl_net: torch.autograd.grad(m(xin), xin, g)
        timing = timer.time(f"bn{c}_kernel", fns, rounds=rounds, repeats=repeats, warmup=1, threads=threads)
        kernels[f"bn{c}"] = {**timing.stat("min_ms"), "rerouted_vs_nchw": timing.ratio("channels_last_rerouted", "nchw"),
                             "native_vs_nchw": timing.ratio("channels_last", "nchw")}
    return {"step_time_ratio": timer.ratio("bn_backward_step_time_ratio", "bn_backward_step", "auto", "native"),
            "out_of_place_act_step_time_ratio": timer.ratio("out_of_place_act_step_time_ratio", "bn_backward_step",
                                                            "auto_out_of_place", "auto"),
            "both_step_time_ratio": timer.ratio("channels_last_fixes_step_time_ratio", "bn_backward_step",
                                                "auto_out_of_place", "native"),
            "threads": threads, "batch": b, "kernel_ms": kernels}


def main(argv: list[str]) -> dict[str, Any]:
    parser = bench_parser("training_efficiency", __doc__.splitlines()[0])
    parser.set_defaults(threads=1)  # stable figures on a shared 2-core machine (the DDP part sets its own)
    parser.add_argument("--skip", nargs="*", default=[], choices=["ckpt", "bf16", "ddp", "alloc", "compile", "bn"],
                        help="parts to leave out (their RESULT keys read none)")
    parser.add_argument("--memory-budget", type=float, default=MEMORY_BUDGET,
                        help=f"the checkpointing rows' memory_budget (default {MEMORY_BUDGET}; 0 < value < 1)")
    args = parser.parse_args(argv)
    if not 0.0 < args.memory_budget < 1.0:
        parser.error(f"--memory-budget={args.memory_budget}: valid values lie strictly between 0 and 1 "
                     "(the share of saved activations to keep)")
    threads = set_threads(args.threads)
    timer = Timings()
    payload: dict[str, Any] = {"quick": args.quick, "cpu_capability": cpu_capability(), "memory_budget": args.memory_budget}
    t0 = time.perf_counter()
    ckpt = _checkpointing(timer, args.quick, threads, args.memory_budget) if "ckpt" not in args.skip else {}
    bf16 = _bf16(timer, args.quick, threads) if "bf16" not in args.skip else {}
    ddp = _ddp(args.quick) if "ddp" not in args.skip else {}
    alloc = _allocator(args.quick) if "alloc" not in args.skip else {}
    set_threads(threads)
    layout = _compile_and_layout(timer, args.quick, threads) if "compile" not in args.skip else {}
    bn = _batchnorm_backward(timer, args.quick, threads) if "bn" not in args.skip else {}
    payload.update(checkpointing=ckpt, bf16=bf16, ddp=ddp, allocator=alloc, compile_and_layout=layout, batchnorm_backward=bn,
                   wall_s=time.perf_counter() - t0)
    if ckpt:
        print(format_table(ckpt))
    if bf16:
        print(format_table(bf16["auto"], columns=["fp32_ms", "bf16_ms", "ratio", "auto"]))
    worst = max(ckpt.values(), key=lambda r: r["activation_ratio"]) if ckpt else {}
    slowest = max(ckpt.values(), key=lambda r: r["step_time_ratio"]) if ckpt else {}
    result = {
        "ckpt_activation_ratio": worst.get("activation_ratio"),
        "ckpt_step_time_ratio": slowest.get("step_time_ratio"),
        "bf16_step_time_ratio": bf16.get("step_time_ratio"),
        "bf16_loss_diff": bf16.get("loss_diff"),
        "ddp2_throughput_ratio": ddp.get("throughput_ratio"),
        "compile_step_time_ratio": layout.get("compile_step_time_ratio"),
        "channels_last_latency_ratio": layout.get("channels_last_latency_ratio"),
        "frozen_ts_latency_ratio": layout.get("frozen_ts_latency_ratio"),
        "allocator_step_time_ratio": alloc.get("step_time_ratio"),
        "bn_backward_step_time_ratio": bn.get("step_time_ratio"),
        "out_of_place_act_step_time_ratio": bn.get("out_of_place_act_step_time_ratio"),
    }
    write_bench("training_efficiency", payload, result, args.out, timings=timer)
    return result
