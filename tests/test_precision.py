"""Mixed precision: ``auto`` resolves by hardware (mocked CPUs with and without AMX / AVX-512-BF16, CUDA),
the presets compose, the CLI records the choice, QAT refuses it, distillation runs under it."""
from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch
from user_module import UserData, UserModule, UserNet, user_trainer

from lightning_eff.callbacks import Distillation, QuantizationAwareTraining
from lightning_eff.cli import compose, run
from lightning_eff.errors import ConfigError
from lightning_eff.training import precision as P

AVX2 = {"capability": "AVX2", "avx2": True, "avx512f": False, "avx512_bf16": False, "amx_bf16": False}
AMX = {"capability": "AVX512", "avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": True, "amx_tile": True}
AVX512_BF16 = {**AVX2, "capability": "AVX512", "avx512f": True, "avx512_bf16": True}


@pytest.mark.parametrize("flags,expected", [(AVX2, "32-true"), (AMX, "bf16-mixed"), (AVX512_BF16, "32-true")])
def test_auto_on_cpus(flags, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert P.resolve_precision("auto", accelerator="auto", flags=flags) == expected
    assert P.resolve_precision("auto", accelerator="cpu", flags=flags) == expected


@pytest.mark.parametrize("bf16,expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_cuda(bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "mock GPU")
    assert P.resolve_precision("auto", accelerator="gpu", flags=AMX) == expected
    assert P.resolve_precision("auto", accelerator="cpu", flags=AVX2) == "32-true"  # the CPU asked for: its rule


def test_explicit_values_pass_and_bad_ones_are_refused():
    assert P.resolve_precision("bf16-mixed") == "bf16-mixed"
    assert P.resolve_precision(32) == "32"
    with pytest.raises(ConfigError, match=r"trainer.precision='bf16'.*choices.*Did you mean"):
        P.resolve_precision("bf16")


@pytest.mark.parametrize("preset", ["32-true", "bf16-mixed", "16-mixed", "auto"])
def test_presets_compose(preset):
    cfg = compose("mobilenet_baseline", [f"trainer/precision={preset}"])
    assert cfg.trainer.precision == preset
    assert cfg.trainer.strategy == "auto" and cfg.trainer.devices == 1  # the distributed preset beside it


def test_cli_resolves_once_and_records_it(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="lightning_eff")
    monkeypatch.setattr(P, "cpu_flags", lambda: dict(AMX))  # as if on an AMX machine: auto -> bf16-mixed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose("mobilenet_baseline", ["trainer/precision=auto", "++trainer.fast_dev_run=true", "model=mobilenetv2_tiny",
                                         f"run_dir={tmp_path}", "print_report=false", "report.latency=false", "report.memory=false"])
    result = run(cfg)
    assert result["precision"]["requested"] == "auto" and result["precision"]["resolved"] == "bf16-mixed"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["precision"]["resolved"] == "bf16-mixed" and saved["config"]["trainer"]["precision"] == "bf16-mixed"
    assert saved["precision"]["facts"]["amx_bf16"] is True
    text = "\n".join(r.getMessage() for r in caplog.records)  # the CLI's progress lines (ProgressLog: test_progress.py)
    assert "stage fit (1/1) started: precision bf16-mixed" in text and "stage fit done in" in text
    assert "report: measuring every variant" in text and "run done in" in text


def test_qat_refuses_mixed_precision(tmp_path):
    trainer = user_trainer(tmp_path, [QuantizationAwareTraining(engines=["x86"], module_attr="net")], precision="bf16-mixed")
    with pytest.raises(ConfigError, match="needs 32-bit training"):
        trainer.fit(UserModule(), datamodule=UserData())


def test_distillation_teacher_runs_under_the_same_autocast(tmp_path):
    seen = []
    teacher = UserNet().eval()
    teacher.fc.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    L.seed_everything(0, verbose=False)
    module = UserModule()
    trainer = user_trainer(tmp_path, [Distillation(teacher=teacher, module_attr="net")], precision="bf16-mixed",
                           limit_val_batches=0)
    trainer.fit(module, datamodule=UserData())
    assert seen and set(seen) == {torch.bfloat16}  # teacher logits in bf16: inside the student's autocast
    assert torch.isfinite(trainer.callback_metrics["distill/kd_loss"])
