"""Train with a recipe: ``python train.py +recipe=mobilenet_qat [key=value ...]``.

A thin Hydra shim: composition happens here, everything else in ``lightning_eff.cli.run``.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lightning_eff.errors import ConfigError


def _check_recipe_args(argv: list[str]) -> None:
    """Fail fast (with did-you-mean) on an unknown ``+recipe=`` before Hydra composes anything."""
    from lightning_eff.recipes import (
        check_recipe,  # light: --help and config errors answer without importing torch
    )

    for arg in argv:
        if arg.lstrip("+").startswith("recipe=") and "," not in arg:
            check_recipe(arg.split("=", 1)[1])


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lightning_eff.cli import run

    hc = HydraConfig.get()
    if cfg.get("run_dir") is None:  # a run_dir= on the command line wins over Hydra's output folder
        cfg.run_dir = hc.runtime.output_dir
    try:
        result = run(cfg, multirun=hc.mode == RunMode.MULTIRUN)
    except ConfigError as err:  # a clean message, not a stack trace (Hydra would print one)
        print(f"Configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    # Sweepers optimise the returned value: the config's optimized_metric (default test/acc), checked before training.
    return result["objective"]


if __name__ == "__main__":
    try:
        _check_recipe_args(sys.argv[1:])
        main()
    except ConfigError as err:
        print(f"Configuration error: {err}", file=sys.stderr)
        sys.exit(2)
