"""Footprint metrics against hand-computed values, the FootprintMonitor callback, the bench convention."""
from __future__ import annotations

import io
import json
import logging
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eff import atomic
from lightning_eff import measure as fp
from lightning_eff.batch import resize_batch
from lightning_eff.errors import ConfigError

pytestmark = [
    # torch.ao / TorchScript deprecation chatter from the quantized fixtures, not from the code under test
    pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning"),
    pytest.mark.filterwarnings("ignore:The TorchScript type system:UserWarning"),
]


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))  # 4*3+3 + 3*2+2 = 23


def int8_conv_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A float conv net and its FX-converted int8 twin (no BN, so the parameter count is unchanged)."""
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    x = torch.randn(1, 1, 8, 8)
    prepared = quantize_fx.prepare_fx(net, get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    return net, quantize_fx.convert_fx(prepared), x


# ----------------------------------------------------------------- parameters


def test_count_parameters_and_nonzero_by_hand():
    net = tiny()
    assert fp.count_parameters(net) == 23
    assert fp.count_nonzero_parameters(net) == 23
    with torch.no_grad():
        net[0].weight.view(-1)[:5] = 0.0
    assert fp.count_parameters(net) == 23
    assert fp.count_nonzero_parameters(net) == 18


def test_shared_weights_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            return self.head(self.embed(x))

    assert fp.count_parameters(Tied()) == 40


def test_pruning_reparametrization_counts_weight_once_and_effective_nonzeros():
    import torch.nn.utils.prune as prune

    net = tiny()
    prune.l1_unstructured(net[0], "weight", amount=5)
    assert hasattr(net[0], "weight_orig") and hasattr(net[0], "weight_mask")
    assert fp.count_parameters(net) == 23  # weight_orig counted as the weight, the mask is not a parameter
    assert int(torch.count_nonzero(net[0].weight_orig)) == 12  # the stored tensor is still dense
    assert fp.count_nonzero_parameters(net) == 18


def test_parametrize_counts_original_once_and_effective_nonzeros():
    from torch.nn.utils import parametrize

    class RowMask(nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, weight):
            return weight * self.mask

    mask = torch.ones(3, 4)
    mask[0] = 0.0  # one row of 4 weights zeroed
    net = tiny()
    parametrize.register_parametrization(net[0], "weight", RowMask(mask))
    assert (fp.count_parameters(net), fp.count_nonzero_parameters(net)) == (23, 19)
    top = nn.Linear(4, 3)
    parametrize.register_parametrization(top, "weight", RowMask(mask))
    assert (fp.count_parameters(top), fp.count_nonzero_parameters(top)) == (15, 11)


def test_dynamic_quantized_linear_counts_packed_params():
    q = torch.ao.quantization.quantize_dynamic(tiny(), {nn.Linear}, dtype=torch.qint8)
    assert list(q.parameters()) == []  # the weights are only in packed params
    assert fp.count_parameters(q) == 23
    assert 0 < fp.count_nonzero_parameters(q) <= 23
    assert fp.count_macs(q, torch.zeros(1, 4)) == 12 + 6


def test_fx_int8_conv_counts_and_macs_equal_float():
    net, q, x = int8_conv_pair()
    assert fp.count_parameters(net) == 4 * 9 + 4 + 144 * 2 + 2 == 330
    assert fp.count_parameters(q) == 330
    macs = 4 * 6 * 6 * 9 + 144 * 2
    assert fp.count_macs(net, x) == macs
    assert fp.count_macs(q, x) == macs  # quantized ops are counted from module shapes
    scripted = torch.jit.script(q)
    assert fp.count_parameters(scripted) == 330  # read from the scripted packed params


def test_quantized_zero_weights_are_zero_after_dequantize():
    net = tiny()
    with torch.no_grad():
        net[0].weight.view(-1)[:5] = 0.0
    q = torch.ao.quantization.quantize_dynamic(net, {nn.Linear}, dtype=torch.qint8)
    assert fp.count_nonzero_parameters(q) <= 18


# ----------------------------------------------------------------- size


def test_state_dict_bytes_matches_torch_save_and_grows():
    net = tiny()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    assert fp.state_dict_bytes(net) == len(buffer.getvalue())
    bigger = nn.Sequential(nn.Linear(4, 300), nn.ReLU(), nn.Linear(300, 2))
    grown = fp.state_dict_bytes(bigger) - fp.state_dict_bytes(net)
    # 4 bytes per added fp32 parameter, give or take the zip container's 64-byte record alignment
    assert abs(grown - 4 * (fp.count_parameters(bigger) - 23)) <= 4 * 64


def test_gzip_size_bytes_and_path(tmp_path):
    zeros = bytes(100_000)
    noise = os.urandom(100_000)
    assert fp.gzip_size(zeros) < 1_000 < 100_000 <= fp.gzip_size(noise) + 100
    path = tmp_path / "blob.bin"
    path.write_bytes(zeros)
    assert fp.gzip_size(path) == fp.gzip_size(str(path)) == fp.gzip_size(zeros)
    assert fp.file_bytes(path) == 100_000


# ----------------------------------------------------------------- MACs


def test_macs_linear_and_conv_hand_formula():
    assert fp.count_macs(nn.Linear(4, 3), torch.zeros(1, 4)) == 12
    assert fp.count_macs(nn.Linear(4, 3), torch.zeros(5, 4)) == 60
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert fp.count_macs(conv, torch.zeros(1, 3, 10, 10)) == (8 * 10 * 10) * (3 * 3 * 3)
    depthwise = nn.Conv2d(4, 4, 3, groups=4)
    assert fp.count_macs(depthwise, torch.zeros(1, 4, 6, 6)) == (4 * 4 * 4) * (1 * 3 * 3)


def test_macs_tuple_and_dict_inputs_restore_training_mode():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    net = Two().train()
    net.b.eval()
    assert fp.count_macs(net, (torch.zeros(1, 4), torch.zeros(1, 2))) == 12 + 6
    assert fp.count_macs(net, {"x": torch.zeros(1, 4), "y": torch.zeros(1, 2)}) == 18
    assert net.training and net.a.training and not net.b.training  # each module's own mode restored


# ----------------------------------------------------------------- latency and memory


def test_latency_positive_finite_and_thread_count_restored():
    before = torch.get_num_threads()
    net = tiny()
    for target in (net, torch.jit.script(net), lambda x: x * 2):
        ms = fp.measure_latency(target, torch.zeros(1, 4), warmup=1, repeats=3, threads=1)
        assert math.isfinite(ms) and ms > 0
        assert torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="repeats"):
        fp.measure_latency(net, torch.zeros(1, 4), repeats=0)


def test_measure_latencies_per_batch_size():
    seen = []

    def make(batch):
        seen.append(batch)
        return torch.zeros(batch, 4)

    out = fp.measure_latencies(tiny(), make, batch_sizes=(1, 8), warmup=0, repeats=2)
    assert set(out) == {1, 8} and seen == [1, 8] and all(v > 0 for v in out.values())
    assert set(fp.measure_latencies(tiny(), torch.zeros(1, 4), batch_sizes=(2,), repeats=1)) == {2}


def test_resize_batch_repeats_along_dim0():
    x = torch.arange(3.0).view(1, 3)
    assert torch.equal(resize_batch(x, 4), x.repeat(4, 1))
    assert torch.equal(resize_batch(torch.arange(6).view(3, 2), 1), torch.tensor([[0, 1]]))
    out = resize_batch({"ids": torch.ones(1, 5, dtype=torch.long), "text": ["a b"], "n": 7}, 3)
    assert out["ids"].shape == (3, 5) and out["text"] == ["a b"] * 3 and out["n"] == 7
    a, b = resize_batch((torch.zeros(1, 2), torch.zeros(1)), 2)
    assert a.shape == (2, 2) and b.shape == (2,)


def test_peak_memory_two_live_activations():
    # Linear(256->1024) output (64x1024 fp32 = 256 KiB) is alive while ReLU writes its own output
    # (another 256 KiB), so the forward's peak is 512 KiB = 0.5 MiB (+ the tiny 64x10 logits later).
    net = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10))
    peak = fp.peak_memory_mb(net, torch.randn(64, 256))
    assert 0.5 <= peak <= 0.5 + 0.05
    inplace = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(inplace=True), nn.Linear(1024, 10))
    assert 0.25 <= fp.peak_memory_mb(inplace, torch.randn(64, 256)) < 0.3
    assert fp.process_peak_rss_mb() > 10


# ----------------------------------------------------------------- report


KEYS = {"params", "nonzero_params", "sparsity", "fp32_bytes", "gzip_bytes", "macs", "latency_ms_b1", "latency_ms_b32", "peak_mem_mb"}


def test_measure_footprint_keys_and_values():
    net = tiny()
    report = fp.measure_footprint(net, torch.zeros(1, 4), warmup=1, repeats=2, threads=1)
    assert set(report) == KEYS
    assert report["params"] == 23 and report["macs"] == 18 and report["sparsity"] == 0.0
    assert report["fp32_bytes"] == fp.state_dict_bytes(net) and 0 < report["gzip_bytes"]
    assert report["latency_ms_b1"] > 0 and report["latency_ms_b32"] > 0 and report["peak_mem_mb"] >= 0
    off = fp.measure_footprint(net, torch.zeros(1, 4), batch_sizes=(4,), latency=False, memory=False)
    assert off["latency_ms_b4"] is None and off["peak_mem_mb"] is None and "latency_ms_b1" not in off


def test_measure_footprint_failures_become_none(caplog):
    class Broken(nn.Linear):
        def forward(self, x):
            raise RuntimeError("boom")

    with caplog.at_level(logging.WARNING, logger="lightning_eff.measure.footprint"):
        report = fp.measure_footprint(Broken(4, 3), torch.zeros(1, 4), repeats=1)
    assert report["params"] == 15
    assert report["macs"] is None and report["latency_ms_b1"] is None and report["peak_mem_mb"] is None
    assert "boom" in caplog.text
    _, q, x = int8_conv_pair()
    with caplog.at_level(logging.WARNING, logger="lightning_eff.measure.footprint"):
        scripted = fp.measure_footprint(torch.jit.script(q), x, batch_sizes=(1,), repeats=1, memory=False)
    assert scripted["macs"] is None and scripted["params"] == 330 and scripted["latency_ms_b1"] > 0


def test_format_table_rows_units_and_missing():
    rows = {
        "fp32": {"params": 2_240_000, "fp32_bytes": 9_000_000, "macs": 24_000_000, "latency_ms_b1": 7.5, "sparsity": 0.0},
        "ptq_int8": {"params": 2_240_000, "fp32_bytes": 2_400_000, "macs": None, "latency_ms_b1": 2.25, "sparsity": 0.5},
    }
    table = fp.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["variant", "params", "fp32_bytes"]
    assert lines[2].startswith("fp32") and lines[3].startswith("ptq_int8")
    assert "2.24 M" in table and "8.58 MiB" in table and "24 MMACs" in table and "7.5 ms" in table and "50.0 %" in table
    assert lines[3].split()[5] == "-"  # missing MACs
    only = fp.format_table(rows, ["latency_ms_b1", "test/acc"])
    assert "params" not in only and only.splitlines()[2].rstrip().endswith("-")


def test_write_results_atomic_valid_json(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "results.json"
    fp.write_results(path, {"footprint": {"params": 23, "lat": float("nan")}, "t": torch.tensor(0.5)})
    assert json.loads(path.read_text()) == {"footprint": {"params": 23, "lat": None}, "t": 0.5}

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        fp.write_results(path, {"new": 1})
    assert json.loads(path.read_text())["footprint"]["params"] == 23  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp file left


# ----------------------------------------------------------------- callback

import lightning.pytorch as pl  # noqa: E402

from lightning_eff.callbacks.footprint import FootprintMonitor  # noqa: E402


class TinyTask(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # 40 + 18 = 58 params

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, _):
        x, y = batch
        self.log("test/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)), batch_size=8)


def trainer(tmp_path, callbacks):
    checkpointing = any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks)
    return pl.Trainer(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=checkpointing, max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
        accelerator="cpu", devices=1, callbacks=callbacks,
    )


def test_monitor_fit_then_test_writes_results(tmp_path):
    monitor = FootprintMonitor(batch_sizes=[1, 4], repeats=2, warmup=1, threads=1)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="footprint/nonzero_params", mode="min")
    t = trainer(tmp_path, [monitor, checkpoint])
    task = TinyTask()
    t.fit(task, loader(), loader())
    assert t.callback_metrics["footprint/params"] == 58
    assert "footprint/sparsity" in t.callback_metrics and "footprint/fp32_bytes" in t.callback_metrics
    assert checkpoint.best_model_path  # the monitored footprint metric was usable
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) >= {"footprint", "metrics"}
    assert set(data["footprint"]) == KEYS - {"latency_ms_b32"} | {"latency_ms_b4", "model"}
    assert data["footprint"]["model"] == "float network (eager PyTorch)"
    assert data["footprint"]["params"] == 58 and data["footprint"]["macs"] == 4 * 8 + 8 * 2
    assert "val/acc" in data["metrics"] and data["stage"] == "fit"

    t.test(task, loader())
    assert t.callback_metrics["footprint/macs"] == 48  # final figures logged in on_test_epoch_end
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"val/acc", "test/acc"} <= set(data["metrics"]) and data["stage"] == "test"
    assert monitor.report == data
    fresh = FootprintMonitor()
    fresh.load_state_dict(monitor.state_dict())
    assert fresh.report == monitor.report


def test_monitor_failing_measurement_does_not_kill_fit(tmp_path, monkeypatch):
    import lightning_eff.callbacks.footprint as cb

    def boom(*args, **kwargs):
        raise RuntimeError("measurement exploded")

    monkeypatch.setattr(cb, "measure_footprint", boom)
    monitor = FootprintMonitor(output_dir=str(tmp_path / "out"))
    t = trainer(tmp_path, [monitor])
    with pytest.warns(UserWarning, match="measurement exploded"):
        t.fit(TinyTask(), loader(), loader())
    assert t.state.finished and t.callback_metrics["footprint/params"] == 58
    assert not (tmp_path / "out" / "results.json").exists()


def test_monitor_inputs_from_datamodule_and_dict_batches(tmp_path):
    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return loader()

        def val_dataloader(self):
            return loader()

        def sample_inputs(self, n):
            return torch.zeros(n, 4)

    monitor = FootprintMonitor(batch_sizes=[2], repeats=1, warmup=0, memory=False, log_every_validation=False)
    t = trainer(tmp_path, [monitor])
    t.fit(TinyTask(), datamodule=DM())
    assert monitor.report["footprint"]["latency_ms_b2"] > 0 and monitor.report["footprint"]["peak_mem_mb"] is None
    assert "val/acc" in t.callback_metrics and "footprint/params" not in t.callback_metrics
    from lightning_eff.batch import model_inputs

    assert set(model_inputs({"input_ids": 1, "labels": 2})) == {"input_ids"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_sizes": [0]}, "batch_sizes"),
        ({"batch_sizes": "1"}, "batch_sizes"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"threads": 0}, "threads"),
        ({"latency": "yes"}, "latency"),
        ({"filename": "results.txt"}, "filename"),
    ],
)
def test_monitor_rejects_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FootprintMonitor(**kwargs)


@pytest.mark.heavy
@pytest.mark.ddp
@pytest.mark.slow
def test_monitor_under_ddp_rank_zero_writes(tmp_path):
    monitor = FootprintMonitor(batch_sizes=[1], repeats=1, warmup=0, threads=1, memory=False)
    t = pl.Trainer(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
        accelerator="cpu", devices=2, strategy="ddp_spawn", callbacks=[monitor],
    )
    t.fit(TinyTask(), loader(), loader())
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["footprint"]["params"] == 58 and data["footprint"]["latency_ms_b1"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".json", ".tmp")) == ["results.json"]


# ----------------------------------------------------------------- bench convention


def test_bench_dispatch_and_result_line(tmp_path, capsys):
    from lightning_eff.bench import __main__ as bench
    from lightning_eff.bench.common import format_result_line, write_bench

    assert "footprint" in bench.available() and "common" not in bench.available()
    assert bench.main(["footprnt"]) == 2
    assert "available: " in capsys.readouterr().err
    line = format_result_line({"params": 700202, "ratio": 0.312345, "none": None})
    assert line == "RESULT params=700202 ratio=0.3123 none=none"
    path = write_bench("demo", {"rows": {"a": 1}}, {"x": 1.23456}, out_dir=tmp_path)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "RESULT x=1.235"
    data = json.loads(path.read_text())
    assert data["result"] == {"x": 1.23456} and data["details"] == {"rows": {"a": 1}} and data["benchmark"] == "demo"


@pytest.mark.slow
def test_bench_footprint_runs(tmp_path, capsys):
    from lightning_eff.bench import footprint

    result = footprint.main(["--quick", "--batch-sizes", "1", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    assert result["params"] > 0 and result["macs"] > 0 and result["latency_ms_b1"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT params=")
    assert json.loads((tmp_path / "footprint.json").read_text())["details"]["rows"]["mnv2_w1.0"]["params"] > result["params"]
