"""``python -m lightning_eff.bench <name> [--quick] [options]``: run one benchmark.

Dispatches to ``lightning_eff.bench.<name>.main(argv) -> dict``; every ``.py`` module of this
package except ``common`` and ``__main__`` is a benchmark.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from lightning_eff.errors import did_you_mean

_NOT_BENCHMARKS = {"common", "__main__", "__init__"}


def available() -> list[str]:
    """Names of the benchmark modules in this package, sorted."""
    folder = Path(__file__).resolve().parent
    return sorted(info.name for info in pkgutil.iter_modules([str(folder)]) if info.name not in _NOT_BENCHMARKS and not info.ispkg)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark named by ``argv[0]`` with the remaining arguments; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m lightning_eff.bench <name> [--quick] [options]\navailable benchmarks: {', '.join(names)}")
        return 0 if argv else 2
    name = argv[0]
    if name not in names:
        print(f"error: unknown benchmark {name!r}; available: {', '.join(names)}.{did_you_mean(name, names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"lightning_eff.bench.{name}")
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
