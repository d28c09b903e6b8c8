"""The pruning recipes compose, validate and run end to end on a small slice of Fashion-MNIST."""
from __future__ import annotations

import pytest
from conftest import TINY_OVERRIDES, needs_fmnist

from lightning_eff.cli import compose, run, validate_config
from lightning_eff.errors import ConfigError

RECIPES = ["mobilenet_prune", "mobilenet_prune_structured", "mobilenet_prune_qat"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(recipe):
    cfg = compose(recipe, ["++trainer.fast_dev_run=true"])
    validate_config(cfg)
    assert cfg.callbacks.pruning.amount > 0


@needs_fmnist
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_fast_dev_run(recipe, tmp_path):
    extra = ["stages.finetune.callbacks.qat.engines=[x86]", "++report.latency=false"] if recipe == "mobilenet_prune_qat" else []
    run(compose(recipe, [f"run_dir={tmp_path}", "++trainer.fast_dev_run=true", "model.width=0.25", *extra, *TINY_OVERRIDES]))
    assert (tmp_path / "results.json").exists()


@needs_fmnist
@pytest.mark.slow
def test_prune_qat_recipe_keeps_sparsity_in_int8(tmp_path):
    """Both stages run (float pruning, then QAT with the zeros kept); the int8 row keeps the sparsity,
    and the report says per backend (fp32 eager, int8 x86) whether the zeros bought latency."""
    result = run(compose("mobilenet_prune_qat", [f"run_dir={tmp_path}", "model.width=0.25", "stages.finetune.callbacks.qat.engines=[x86]",
                                                 "report.batch_sizes=[1]", "report.repeats=2", "report.memory=false", *TINY_OVERRIDES]))
    rows = result["report"]
    assert rows["fp32"]["sparsity"] > 0.6
    assert rows["qat_int8_x86"]["sparsity"] > 0.6
    assert any(a["variant"] == "pruned_sparse_int8" for a in result["artifacts"])
    for variant, backend in (("fp32", "fp32 eager CPU"), ("qat_int8_x86", "int8 x86")):
        assert rows[variant]["weight_zero_fraction"] > 0.7 and isinstance(rows[variant]["sparsity_bought_latency"], bool)
        (sentence,) = [s for s in result["sparsity_latency"] if s.startswith(f"{variant} ({backend}): ")]
        assert ("bought NO latency" in sentence) == (not rows[variant]["sparsity_bought_latency"])


@needs_fmnist
@pytest.mark.slow
def test_prune_recipe_reaches_target_and_reports(tmp_path):
    result = run(compose("mobilenet_prune", [f"run_dir={tmp_path}", "model.width=0.25", *TINY_OVERRIDES]))
    (entry,) = [a for a in result["artifacts"] if a["variant"].startswith("pruned_sparse")]
    assert entry["mask_sparsity"] == pytest.approx(0.75, abs=1e-3) and entry["bytes_ratio"] < 0.5
    assert result["report"]["fp32"]["sparsity"] > 0.6


@needs_fmnist
@pytest.mark.slow
def test_structured_recipe_reports_compact_model(tmp_path):
    result = run(compose("mobilenet_prune_structured", [f"run_dir={tmp_path}", "model.width=0.25", *TINY_OVERRIDES]))
    rows = result["report"]
    assert rows["pruned_compact"]["params"] < 0.75 * rows["fp32"]["params"]


def test_bad_recipe_value_is_named(tmp_path):
    cfg = compose("mobilenet_prune", ["callbacks.pruning.amount=1.5", f"run_dir={tmp_path}", *TINY_OVERRIDES])
    with pytest.raises(ConfigError, match=r"callbacks.pruning: amount=1.5 is out of range"):
        run(cfg)
