"""bench pruning's Table 1 row list: every row parses, options are checked before anything trains."""
from __future__ import annotations

import pytest

from lightning_eff.errors import ConfigError


def test_bench_table1_rows_checked_before_training():
    """Every standard row parses (the ModelPruning structured row once did not), options go to ours only."""
    from lightning_eff.bench.pruning import table1_variants

    rows = {name: (sparsity, kind, options) for name, sparsity, kind, options in table1_variants()}
    assert len(rows) == 9 and rows["modelpruning_ln_structured_50"][:2] == (0.5, "lightning_structured")
    (name, sparsity, kind, options), = table1_variants(["ours_unstructured_75_erk_end50"])
    assert (sparsity, kind, options) == (0.75, "ours", {"distribution": "erk", "begin_fraction": 0.0, "end_fraction": 0.5, "updates": None})
    (_, _, _, options), = table1_variants(["ours_unstructured_50_begin25_updates3"])
    assert (options["begin_fraction"], options["end_fraction"], options["updates"]) == (0.25, 0.75, 3)
    with pytest.raises(ConfigError, match="must come before end"):
        table1_variants(["ours_unstructured_50_begin80"])
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        table1_variants(["dense", "ours_unstructured_75_bogus"])
    with pytest.raises(ConfigError, match=r"unknown rows \['modelpruning_unstructured_60'\]"):
        table1_variants(["modelpruning_unstructured_60"])


def test_bench_executorch_program_runs_the_pruned_network(tmp_path):
    """(b)'s ExecuTorch figure times a faithful program: the channel-pruned network, lowered, gives its outputs."""
    pytest.importorskip("executorch")
    import torch

    from lightning_eff.bench.pruning import executorch_program
    from lightning_eff.compression.pruning import prune_channels
    from lightning_eff.models import create_model

    torch.manual_seed(0)
    dense = create_model("mobilenetv2", width=0.35, depth=0.3, num_classes=10, in_chans=1, small_input_stages=1).eval()
    small = prune_channels(dense, 0.5).eval()
    x = torch.randn(2, 1, 32, 32)
    program = executorch_program(small, x, str(tmp_path))
    out = program(x)
    with torch.no_grad():
        assert torch.allclose(out, small(x), atol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < 0.6 * sum(p.numel() for p in dense.parameters())
