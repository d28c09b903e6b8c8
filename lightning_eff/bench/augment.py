"""The survey's Table 3 analog: the accuracy each augmentation adds over none, at a fixed training budget.

Every row is one run of the ``mobilenet_augment`` recipe (MobileNetV2 width 0.5 on 10% of the
Fashion-MNIST labels by default (``--label-fraction``), every class, a fixed number of optimizer steps; validation and test never
augmented) with one training transform (``data/train_transform=<row>``) or label mixing
(``+task/mixup=<row>``), through the same ``cli.run`` a user's ``python train.py`` calls. Headline rows
run with several seeds (data order, initialisation and augmentation draws all follow the seed) and
report mean and spread (max - min); the gain of a row is its mean minus the baseline's mean.

Final line: ``RESULT baseline_acc=<a> <row>_gain=<g> ... best_row=<name> runs=<n>``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning_eff.bench.common import bench_parser, set_threads, write_bench
from lightning_eff.measure import cpu_capability, format_table

__all__ = ["main", "ROWS", "HEADLINE", "overrides_for"]

TRANSFORMS = ("flip", "crop", "rotate", "shear", "translate", "scale", "resized_crop", "rand_augment", "auto_augment",
              "trivial_augment", "random_erasing", "standard")
MIXING = ("mixup", "cutmix", "mixup_cutmix")
ROWS = ("none", *TRANSFORMS, *MIXING)
HEADLINE = ("none", "rand_augment", "mixup", "cutmix", "standard")


def overrides_for(row: str) -> list[str]:
    """The Hydra overrides of one table row on top of the ``mobilenet_augment`` recipe."""
    if row == "none":
        return ["data.train_transform=null"]
    if row in MIXING:
        return ["data.train_transform=null", f"+task/mixup={row}"]
    if row in TRANSFORMS:
        return [f"data/train_transform={row}"]
    raise SystemExit(f"unknown row {row!r}; choose from {list(ROWS)}")


def _run(row: str, seed: int, steps: int, limit_test: int | None, root: Path, label_fraction: float) -> float:
    from lightning_eff.cli import compose, run

    extra = [f"seed={seed}", f"data.seed={seed}", f"data.label_fraction={label_fraction}", f"trainer.max_steps={steps}",
             f"trainer.val_check_interval={steps}",
             f"run_dir={root / f'{row}_s{seed}'}", "print_report=false", "progress=false",
             "report.latency=false", "report.memory=false", "++trainer.enable_progress_bar=false",
             "++trainer.enable_model_summary=false", "callbacks.checkpoint=null"]
    if limit_test:
        extra.append(f"data.limit_test={limit_test}")
    out = run(compose("mobilenet_augment", [*overrides_for(row), *extra]))
    return float(out["metrics"]["test/acc"])


def main(argv: list[str]) -> dict[str, Any]:
    parser = bench_parser("augment", __doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=None, help=f"rows to run (default: all; quick: {list(HEADLINE[:3])})")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the headline rows (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 150; quick 40)")
    parser.add_argument("--label-fraction", type=float, default=0.1,
                        help="fraction of the training labels (every class) each run trains on (default 0.1)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    quick = args.quick
    rows = args.rows or (list(HEADLINE[:3]) if quick else list(ROWS))
    seeds = args.seeds or (1 if quick else 3)
    steps = args.steps or (40 if quick else 150)
    if not 0.0 < args.label_fraction <= 1.0:
        raise SystemExit(f"--label-fraction={args.label_fraction} is not a fraction in (0, 1]")
    limit_test = 2000 if quick else None
    if "none" not in rows:
        rows = ["none", *rows]
    t0 = time.perf_counter()
    accs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_augment_") as tmp:
        for row in rows:
            n = seeds if row in HEADLINE else 1
            accs[row] = [_run(row, seed, steps, limit_test, Path(tmp), args.label_fraction) for seed in range(n)]
            print(f"augment row {row}: test acc {accs[row]}", flush=True)
    base = statistics.mean(accs["none"])
    table = {row: {"seeds": len(a), "test_acc_mean": statistics.mean(a), "spread": max(a) - min(a) if len(a) > 1 else None,
                   "gain_vs_none": statistics.mean(a) - base, "accs": a} for row, a in accs.items()}
    print(format_table(table, columns=["seeds", "test_acc_mean", "spread", "gain_vs_none"]))
    best = max((r for r in table if r != "none"), key=lambda r: table[r]["gain_vs_none"], default=None)
    result: dict[str, Any] = {"baseline_acc": base}
    result.update({f"{row}_gain": table[row]["gain_vs_none"] for row in table if row != "none"})
    result.update(best_row=best, runs=sum(len(a) for a in accs.values()))
    payload = {"quick": quick, "cpu_capability": cpu_capability(), "steps": steps, "label_fraction": args.label_fraction, "seeds": seeds,
               "limit_test": limit_test, "rows": table, "wall_s": time.perf_counter() - t0}
    write_bench("augment", payload, result, args.out)
    return result
