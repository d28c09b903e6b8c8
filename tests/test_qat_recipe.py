"""``mobilenet_qat`` through the CLI on a small slice of Fashion-MNIST: every stage's artifacts and report rows."""
from __future__ import annotations

import os

import pytest
from conftest import TINY_OVERRIDES, needs_fmnist
from test_qat_executorch import needs_pt2e

from lightning_eff.cli import compose, run


@needs_fmnist
@needs_pt2e
@pytest.mark.export
@pytest.mark.slow
def test_mobilenet_qat_recipe_writes_qat_pte_and_weight_only_rows(tmp_path):
    # Stage 1's .pte exports (fp32, PTQ int8) are left out: they predate this test and cost ~40 s here.
    result = run(compose("mobilenet_qat", [f"run_dir={tmp_path}", "++trainer.fast_dev_run=true", "model.width=0.25", "model.depth=0.3",
                                           "callbacks.export.formats=[pt]", "stages.finetune.callbacks.qat.engines=[x86]",
                                           "++report.latency=false", *TINY_OVERRIDES]))
    artifacts = {f"{a['variant']}.{a['format']}": a for a in result["artifacts"]}
    assert not [name for name, a in artifacts.items() if "error" in a], artifacts
    # Stage 1: float + PTQ exports and the packed weight-only files; stage 2: QAT int8 for TorchScript/lite,
    # and the QAT-trained weights as an int8 ExecuTorch program (pt2e-calibrated).
    assert {"fp32.pt", "ptq_int8_x86.pt", "qat_int8_x86.pt", "qat_int8_x86.ptl", "qat_weights_ptq_int8_xnnpack.pte",
            "weight_only_int8.weight_only", "weight_only_int4.weight_only"} <= set(artifacts)
    qat_pte = artifacts["qat_weights_ptq_int8_xnnpack.pte"]
    assert os.path.exists(qat_pte["path"]) and qat_pte["bytes"] < 0.5 * artifacts["fp32.pt"]["bytes"]
    assert artifacts["weight_only_int4.weight_only"]["bytes"] < artifacts["weight_only_int8.weight_only"]["bytes"]
    assert artifacts["weight_only_int8.weight_only"]["bytes"] < 0.5 * artifacts["weight_only_int8.weight_only"]["float_bytes"]
    # Weight-only variants are measured like every other row of the report (test accuracy).
    rows = result["report"]
    for variant in ("fp32", "ptq_int8_x86", "qat_int8_x86", "weight_only_int8", "weight_only_int4"):
        assert 0.0 <= rows[variant]["test_acc"] <= 1.0, variant
