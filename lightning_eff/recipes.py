"""Where the configs live, and which recipes exist: what ``train.py`` checks before anything heavy is imported.

Why a module of its own (app layer, beside :mod:`lightning_eff.cli`): ``python train.py --help``, a Hydra
override error and a misspelt ``+recipe=`` should answer in about a second, without importing torch or
Lightning (about 8 s here). :mod:`lightning_eff.cli` re-exports these names.
"""
from __future__ import annotations

from pathlib import Path

from lightning_eff.errors import ConfigError, did_you_mean

__all__ = ["REPO_ROOT", "CONF_DIR", "RECIPE_DIR", "list_recipes", "check_recipe"]

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
RECIPE_DIR = REPO_ROOT / "recipes"


def list_recipes() -> list[str]:
    """Names of the recipes in ``recipes/`` (the ``+recipe=NAME`` choices)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def check_recipe(name: str) -> None:
    """Raise ``ConfigError`` with a did-you-mean when ``name`` is not a recipe."""
    recipes = list_recipes()
    if name not in recipes:
        raise ConfigError(f"recipe={name!r} does not exist; available recipes: {recipes}.{did_you_mean(name, recipes)}")
