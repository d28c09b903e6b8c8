"""Config composition and validation, and one real end-to-end run through the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES, needs_fmnist
from omegaconf import OmegaConf

from lightning_eff.cli import REPO_ROOT, compose, list_recipes, run, validate_config
from lightning_eff.errors import ConfigError


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_composes_and_validates(recipe):
    cfg = compose(recipe, ["++trainer.fast_dev_run=true"])
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # e.g. pqrnn_kd's teacher-logit cache: refused by name until given
        with pytest.raises(ConfigError, match=rf"required value\(s\) not set: \['{missing[0]}'"):
            validate_config(cfg)
        cfg = compose(recipe, ["++trainer.fast_dev_run=true", *[f"{k}=given" for k in missing]])
    validate_config(cfg)
    assert cfg.name == recipe


def test_unknown_recipe_did_you_mean():
    with pytest.raises(ConfigError, match=r"mobilnet_baseline.*Did you mean 'mobilenet_baseline'"):
        compose("mobilnet_baseline")


@pytest.mark.parametrize(
    "override, match",
    [
        ("+trainer.max_epoch=3", r"unknown key trainer.max_epoch.*Did you mean 'max_epochs'"),
        ("+data.batchsize=3", r"unknown key data.batchsize.*Did you mean 'batch_size'"),
        ("+model.widht=0.5", r"unknown key model.widht.*Did you mean 'width'"),
        ("+foo=1", r"unknown key <root>.foo"),
        ("model.name=mobilenetv9", r"model.name='mobilenetv9' is not registered"),
        ("+callbacks.footprint.repeat=3", r"unknown key callbacks.footprint.repeat.*Did you mean 'repeats'"),
    ],
)
def test_unknown_keys_are_named(override, match):
    cfg = compose("mobilenet_baseline", [override])
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)


@pytest.mark.parametrize(
    "override, match",
    [
        ("task.lr=-1", r"task.lr=-1"),
        ("task.optimizer=adamm", r"task.optimizer='adamm'.*Did you mean 'adamw'"),
        ("model.width=0", r"model.width=0"),
        ("data.val_size=-5", r"data.val_size"),
    ],
)
def test_out_of_range_values_fail_before_training(override, match, tmp_path):
    cfg = compose("mobilenet_baseline", [override, f"run_dir={tmp_path}", *TINY_OVERRIDES])
    with pytest.raises(ConfigError, match=match):
        run(cfg)
    assert not (tmp_path / "results.json").exists()


@needs_fmnist
@pytest.mark.slow
def test_train_py_fast_dev_run_end_to_end(tmp_path):
    """The real entry point: Hydra composes, cli.run trains on real data and writes the report."""
    out = subprocess.run(
        [sys.executable, "train.py", "+recipe=mobilenet_baseline", "++trainer.fast_dev_run=true",
         "++data.limit_train=256", "++data.limit_val=64", "++data.limit_test=64", "++report.repeats=1",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    fp32 = results["report"]["fp32"]
    assert fp32["params"] > 100_000 and fp32["macs"] > 0 and 0.0 <= fp32["test_acc"] <= 1.0
    assert "fp32" in out.stdout  # the printed footprint table


@pytest.mark.parametrize(
    "args, match",
    [
        (["+recipe=mobilnet_baseline"], "Did you mean 'mobilenet_baseline'"),
        (["+recipe=mobilenet_baseline", "trainer.max_epoch=3"], "max_epoch"),
        (["+recipe=mobilenet_baseline", "+trainer.max_epoch=3"], "Did you mean 'max_epochs'"),
    ],
)
def test_train_py_bad_input_messages(args, match, tmp_path):
    out = subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path}"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert match in out.stderr + out.stdout


def test_help_and_info_defaults():
    for args in (["--help"], ["+recipe=mobilenet_baseline", "--info", "defaults"]):
        out = subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert "recipe/mobilenet_baseline" in out.stdout


def test_recipes_are_documented():
    cards = (Path(REPO_ROOT) / "recipes" / "README.md").read_text()
    for recipe in list_recipes():
        assert f"`{recipe}`" in cards, f"recipes/README.md has no card for {recipe}"
