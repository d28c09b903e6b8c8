"""WeightOnlyQuantization: packed b-bit files of the trained model, the accuracy they keep, report variants."""
from __future__ import annotations

import os

import pytest
import torch
from test_qat_executorch import Templates
from test_quant_callbacks import _trainer
from torch import nn

from lightning_eff import (
    ClassificationTask,
    ConfigError,
    Export,
    WeightOnlyQuantization,
)
from lightning_eff.compression.quantization.weight_only import load_quantized
from lightning_eff.report import build_report


def mlp() -> nn.Module:
    """Weights dominate the state (68k of 68.4k parameters), so file bytes track the packed weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _data() -> Templates:
    """Noisy enough that the float model is far from 100% (77.8% measured): accuracy kept is measurable."""
    return Templates(n=640, n_train=320, noise=3.5)


def _fit(tmp_path, callbacks, **kw):
    dm = _data()
    task = ClassificationTask(mlp(), num_classes=10, optimizer="sgd", lr=0.05, scheduler="constant")
    trainer = _trainer(tmp_path, callbacks, max_epochs=3, limit_train_batches=None, limit_test_batches=None, **kw)
    trainer.fit(task, datamodule=dm)
    return trainer, task, dm


def test_weight_only_files_bytes_accuracy_and_report(tmp_path):
    wq = WeightOnlyQuantization(bits=[8, 4, 2], output_dir=str(tmp_path / "wq"))
    export = Export(formats=["pt"], output_dir=str(tmp_path / "art"), latency=False)
    trainer, task, dm = _fit(tmp_path, [wq, export])
    entries = {a["variant"]: a for a in wq.artifacts()}
    assert list(entries) == ["weight_only_int8", "weight_only_int4", "weight_only_int2"]
    weights_fp32 = (256 * 256 + 256 * 10) * 4
    for bits, entry in zip((8, 4, 2), entries.values()):
        assert os.path.getsize(entry["path"]) == entry["bytes"] and entry["path"].startswith(str(tmp_path / "wq"))
        assert entry["weights_fp32_bytes"] == weights_fp32 and entry["quantized_tensors"] == 2
        # packed codes: exactly bits/32 of fp32, plus one fp16 scale and one uint8 zero point per channel
        assert entry["weights_packed_bytes"] == weights_fp32 * bits // 32 + 266 * 3
    # The whole file (biases, scales, zip container included) at 4 bits is ~1/8 of the fp32 weights.
    ratio4 = entries["weight_only_int4"]["bytes"] / weights_fp32
    assert 0.125 < ratio4 < 0.15, ratio4
    assert entries["weight_only_int8"]["bytes"] < 0.27 * entries["weight_only_int8"]["float_bytes"]
    assert not list((tmp_path / "wq").glob(".tmp-*"))  # atomic writes leave no temp files
    # The restored 8-bit model is the float model up to rounding; 2-bit visibly is not.
    assert entries["weight_only_int8"]["top1_agreement"] == 1.0
    assert entries["weight_only_int8"]["weight_rel_error"] < 0.01 < entries["weight_only_int2"]["weight_rel_error"]

    # The packed file alone restores the variant the callback offers.
    restored = load_quantized(entries["weight_only_int4"]["path"], mlp())
    x, y = dm.held_out()
    with torch.no_grad():
        torch.testing.assert_close(restored(x), wq.deployable_models()["weight_only_int4"](x), rtol=0, atol=0)

    # Test end records the accuracy each bit-width keeps.
    trainer.test(task, datamodule=dm, verbose=False)
    entries = {a["variant"]: a for a in wq.artifacts()}
    fp32_acc = entries["weight_only_int8"]["test_acc_fp32"]
    assert 0.6 <= fp32_acc <= 0.95  # learned but not saturated, so "accuracy kept" means something
    # measured: fp32 77.8%, 8-bit 77.8%, 4-bit 76.9%, 2-bit 70.6% (320 test examples)
    assert abs(entries["weight_only_int8"]["test_acc"] - fp32_acc) <= 0.01
    assert entries["weight_only_int2"]["acc_drop"] > 0.02  # and the measurement does see a real loss
    assert entries["weight_only_int8"]["acc_drop"] == pytest.approx(fp32_acc - entries["weight_only_int8"]["test_acc"])

    # Export leaves them alone (their artifact is the packed file); the report shows one row per bit-width.
    assert {a["variant"] for a in export.artifacts()} == {"fp32"}
    report = build_report(task, dm, [wq, export], {"batch_sizes": [1], "latency": False, "memory": False})
    for variant in ("weight_only_int8", "weight_only_int4", "weight_only_int2"):
        assert report["rows"][variant]["test_acc"] == pytest.approx(entries[variant]["test_acc"])
    assert report["rows"]["weight_only_int8"]["test_acc"] == pytest.approx(report["rows"]["fp32"]["test_acc"], abs=0.01)
    by_variant = {a["variant"]: a for a in report["artifacts"]}
    assert by_variant["weight_only_int4"]["bytes"] == entries["weight_only_int4"]["bytes"]


def test_weight_only_default_dir_and_test_without_fit(tmp_path):
    wq = WeightOnlyQuantization(bits=[4], scheme="symmetric")
    dm = _data()
    task = ClassificationTask(mlp(), num_classes=10, optimizer="sgd", lr=0.05, scheduler="constant")
    _trainer(tmp_path, [wq]).test(task, datamodule=dm, verbose=False)
    (entry,) = wq.artifacts()
    assert entry["path"] == str(tmp_path / "weight_only" / "weight_only_int4.pt") and "test_acc" in entry


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": [8, 1]}, r"bits\[\]=1 is not supported; choose one of \[2, 3, 4, 5, 6, 7, 8\]"),
        ({"bits": [9]}, r"bits\[\]=9 is not supported"),
        ({"bits": [4.0]}, r"bits\[\]=4.0 is not supported; choose integers"),
        ({"bits": [True]}, r"bits\[\]=True"),
        ({"bits": []}, r"bits=\[\] produces nothing"),
        ({"bits": [4, 4]}, r"repeats a bit-width"),
        ({"scheme": "binari"}, r"scheme='binari' is not supported.*\['affine', 'symmetric'\]"),
        ({"scheme": "symetric"}, r"Did you mean 'symmetric'"),
        ({"min_params": -1}, r"min_params"),
        ({"min_params": 4, "min_numel": 4}, r"give min_params only"),
        ({"exclude": ["("]}, r"exclude"),
        ({"module_types": [3]}, r"module_types"),
        ({"per_channel": "yes"}, r"per_channel"),
    ],
)
def test_weight_only_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        WeightOnlyQuantization(**kwargs)


def test_weight_only_callback_selects_with_the_shared_options(tmp_path):
    """exclude= keeps the classifier float in the written file (the selection options every technique shares)."""
    wq = WeightOnlyQuantization(bits=[4], exclude=["3"], output_dir=str(tmp_path / "wq"))
    _fit(tmp_path, [wq])
    (entry,) = wq.artifacts()
    assert entry["quantized_tensors"] == 1  # 1.weight only; 3.weight (the classifier) stays float
    with pytest.warns(FutureWarning, match="renamed min_params"):
        assert WeightOnlyQuantization(min_numel=100).min_params == 100


def test_state_key_tells_apart_instances_that_select_other_layers():
    from lightning_eff.callbacks import WeightOnlyQuantization

    default = WeightOnlyQuantization(bits=[8])
    assert default.state_key == WeightOnlyQuantization(bits=[8]).state_key
    assert "include" not in default.state_key and "min_params" not in default.state_key  # pre-existing key unchanged
    others = [WeightOnlyQuantization(bits=[8], exclude=["classifier"]), WeightOnlyQuantization(bits=[8], min_params=1024),
              WeightOnlyQuantization(bits=[8], include=[r"blocks\."]), WeightOnlyQuantization(bits=[8], module_types=["Linear"])]
    assert len({default.state_key, *(cb.state_key for cb in others)}) == 5
