"""Label efficiency: accuracy vs the fraction of labels, from scratch vs from a pretrained backbone.

Reads the ``results.json`` of every run under a Hydra multirun folder (or any folders given), groups
them by what they started from (``scratch``; the stem of ``model.backbone_ckpt``; or the pretraining stage
that handed them a backbone) and ``data.label_fraction`` (runs on ``data.limit_train`` are left out), and writes ``label_efficiency.md`` (a table, mean over seeds) and
``label_efficiency.png`` (accuracy vs label fraction, log x) next to them. The sweep it reads::

    python train.py -m +recipe=mobilenet_finetune data.label_fraction=0.01,0.1,1.0 \\
        model.backbone_ckpt=null,outputs/<run>/simclr/simclr.ckpt
    python -m lightning_eff.label_efficiency multirun/<date>/<time>

A sweep over ``task.lr`` too gives each arm and fraction its own learning rate, picked on ``val/acc``.

Example:
    >>> rows = [{"arm": "scratch", "fraction": 0.01, "acc": 0.70}, {"arm": "simclr", "fraction": 0.01, "acc": 0.78}]
    >>> table = summarize(rows)
    >>> round(table[0.01]["simclr"] - table[0.01]["scratch"], 2)
    0.08
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_eff.errors import ConfigError

__all__ = ["collect", "summarize", "markdown", "plot", "main", "SELECT_METRIC"]

#: The metric that picks an arm's learning rate when the sweep tried several (never the test metric).
SELECT_METRIC = "val/acc"


def _arm(cfg: dict[str, Any]) -> str:
    """What a run started from: ``scratch``, the stem of its ``model.backbone_ckpt``, or the name of the
    pretraining stage that handed it a backbone (``mobilenet_simclr``: ``simclr``)."""
    backbone = (cfg.get("model") or {}).get("backbone_ckpt")
    if backbone:
        path = Path(str(backbone))
        return path.stem if path.stem not in ("last", "model") else path.parent.name
    for name, stage in (cfg.get("stages") or {}).items():
        hands = (stage or {}).get("hands_over") or []
        if "backbone" in ([hands] if isinstance(hands, str) else hands):
            return str(name)
    return "scratch"


def collect(folders: Iterable[str | Path], metric: str = "test/acc") -> list[dict[str, Any]]:
    """One row per ``results.json`` found under ``folders``: ``{"arm", "fraction", "acc", "seed", "path"}``."""
    rows = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            data = json.loads(path.read_text())
            cfg = data.get("config") or {}
            data_cfg = cfg.get("data") or {}
            if metric not in (data.get("metrics") or {}) or data_cfg.get("limit_train") is not None:
                continue  # a run on data.limit_train examples has no label fraction to plot
            fraction = data_cfg.get("label_fraction") or 1.0
            metrics = data["metrics"]
            rows.append({"arm": _arm(cfg), "fraction": float(fraction), "acc": float(metrics[metric]),
                         "val": float(metrics[SELECT_METRIC]) if SELECT_METRIC in metrics else None,
                         "lr": (cfg.get("task") or {}).get("lr"), "seed": cfg.get("seed"), "path": str(path)})
    if not rows:
        raise ConfigError(f"no results.json with {metric!r} under {[str(f) for f in folders]}; run the multirun first.")
    return rows


def summarize(rows: list[dict[str, Any]], chosen: dict | None = None) -> dict[float, dict[str, float]]:
    """``{fraction: {arm: mean accuracy}}`` (mean over seeds), fractions ascending.

    When an arm ran with several learning rates (``task.lr=0.1,0.03`` in the sweep), each arm and fraction
    keeps the learning rate with the best mean validation accuracy (model selection on the validation split;
    the test split is only reported); ``chosen`` (a dict) receives ``{(fraction, arm): lr}``.
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["fraction"], r["arm"], r.get("lr"))].append(r)
    best: dict[tuple, tuple] = {}
    for (fraction, arm, lr), runs in groups.items():
        vals = [r["val"] for r in runs if r.get("val") is not None]
        score = statistics.mean(vals) if vals else float("-inf")
        if (fraction, arm) not in best or score > best[(fraction, arm)][0]:
            best[(fraction, arm)] = (score, lr, statistics.mean(r["acc"] for r in runs))
    if chosen is not None:
        chosen.update({key: lr for key, (_, lr, _) in best.items()})
    table: dict[float, dict[str, float]] = defaultdict(dict)
    for (fraction, arm), (_, _, acc) in sorted(best.items()):
        table[fraction][arm] = acc
    return dict(sorted(table.items()))


def markdown(table: dict[float, dict[str, float]]) -> str:
    """The table as Markdown: one row per label fraction, one column per arm, plus each arm's gain over scratch."""
    arms = sorted({a for row in table.values() for a in row}, key=lambda a: (a != "scratch", a))
    others = [a for a in arms if a != "scratch"]
    head = ["labels", *arms, *(f"{a} − scratch" for a in others if "scratch" in arms)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fraction, row in table.items():
        cells = [f"{fraction:.0%}", *(f"{row[a]:.2%}" if a in row else "–" for a in arms)]
        if "scratch" in arms:
            cells += [f"{(row[a] - row['scratch']) * 100:+.1f} pt" if a in row and "scratch" in row else "–" for a in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: dict[float, dict[str, float]], path: str | Path, title: str = "Label efficiency") -> Path:
    """Accuracy vs label fraction (log x), one line per arm, saved as a PNG (needs matplotlib: the ``plots`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError("label_efficiency.plot needs matplotlib: pip install -e '.[plots]'") from err
    arms = sorted({a for row in table.values() for a in row}, key=lambda a: (a != "scratch", a))
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for arm in arms:
        xs = [f for f in table if arm in table[f]]
        ax.plot(xs, [table[f][arm] * 100 for f in xs], marker="o", label=arm)
    ax.set_xscale("log")
    ax.set_xticks(list(table), [f"{f:.0%}" for f in table])
    ax.set_xlabel("labelled training examples")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_eff.label_efficiency", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="multirun folder(s) holding results.json files")
    parser.add_argument("--metric", default="test/acc")
    parser.add_argument("--out", default=None, help="folder for label_efficiency.md/.png (default: the first folder)")
    parser.add_argument("--title", default="Label efficiency")
    args = parser.parse_args(argv)
    chosen: dict = {}
    table = summarize(collect(args.folders, args.metric), chosen)
    out = Path(args.out or args.folders[0])
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(table)
    if len({lr for lr in chosen.values()}) > 1:
        text += "\n\nlearning rate picked on val/acc: " + ", ".join(
            f"{arm} at {fraction:.0%}: {lr}" for (fraction, arm), lr in sorted(chosen.items()))
    (out / "label_efficiency.md").write_text(text + "\n")
    print(text)
    try:
        print(f"plot: {plot(table, out / 'label_efficiency.png', args.title)}")
    except ConfigError as err:
        print(f"no plot: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
