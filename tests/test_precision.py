"""Mixed precision: ``auto`` resolves by hardware (mocked CPUs with and without AMX / AVX-512-BF16, CUDA) and, where
bf16 hardware exists, by a measurement of the model (mocked ratios; the real probe leaves model and RNG alone);
the presets compose, the CLI records the choice per stage, QAT refuses it, distillation runs under it."""
from __future__ import annotations

import json
import logging
import os

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


FAST = {"fp32_ms": 100.0, "bf16_ms": 60.0, "ratio": 0.6}
SLOW = {"fp32_ms": 187.0, "bf16_ms": 284.0, "ratio": 1.51}  # make train's step on an AMX Xeon, 2026-12-03


@pytest.mark.parametrize("measured,expected", [(FAST, "bf16-mixed"), (SLOW, "32-true"),
                                               ({"ratio": P.BF16_MIN_SPEEDUP}, "bf16-mixed"),
                                               ({"ratio": P.BF16_MIN_SPEEDUP + 0.01}, "32-true")])
@pytest.mark.parametrize("flags", [AMX, AVX512_BF16])
def test_auto_measures_where_bf16_hardware_exists(flags, measured, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    decision = P.choose_precision("auto", "cpu", flags=flags, measure=lambda: measured)
    assert decision["resolved"] == expected and decision["measured"] == measured and decision["requested"] == "auto"
    assert decision["decided_by"] == "measurement"


def test_auto_does_not_measure_without_bf16_hardware_or_on_cuda(monkeypatch):
    def boom():
        raise AssertionError("measured")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert P.choose_precision("auto", "cpu", flags=AVX2, measure=boom) == {
        "requested": "auto", "resolved": "32-true", "facts": P.precision_facts("cpu", AVX2), "decided_by": "hardware rule"}
    assert P.choose_precision("bf16-mixed", "cpu", flags=AMX, measure=boom)["resolved"] == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "mock GPU")
    assert P.choose_precision("auto", "gpu", flags=AMX, measure=boom)["resolved"] == "16-mixed"


def test_a_failed_measurement_trains_in_float32(monkeypatch, caplog):
    def fails():
        raise RuntimeError("no bf16 kernel for this op")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    decision = P.choose_precision("auto", "cpu", flags=AMX, measure=fails)
    assert decision["resolved"] == "32-true" and "no bf16 kernel" in decision["measured"]["error"]
    assert "bf16 measurement failed" in caplog.text


class _DictNet(torch.nn.Module):  # keyword inputs and an HF-style output, dropout drawing from the RNG
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.drop, self.fc = torch.nn.Embedding(50, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = self.drop(self.emb(input_ids)) * attention_mask[..., None]
        return type("Out", (), {"logits": self.fc(h.mean(1))})()


def test_measure_bf16_times_a_copy_and_leaves_model_and_rng_alone():
    torch.manual_seed(0)
    net = UserNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(16, 1, 12, 12)
    state = torch.random.get_rng_state()
    out = P.measure_bf16(net, x, rounds=2, channels_last=True)
    assert out["fp32_ms"] > 0 and out["bf16_ms"] > 0 and out["rounds"] == 2 and out["batch_shape"] == [16, 1, 12, 12]
    assert out["ratio"] == pytest.approx(out["bf16_ms"] / out["fp32_ms"])
    assert torch.equal(torch.random.get_rng_state(), state)  # dropout/shuffling of the run unchanged
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics and weights untouched
    assert net.conv.weight.grad is None and net.conv.weight.is_contiguous()  # no gradient, no layout change left
    inputs = {"input_ids": torch.randint(0, 50, (4, 7)), "attention_mask": torch.ones(4, 7)}
    dict_net = _DictNet()
    state = torch.random.get_rng_state()
    assert P.measure_bf16(dict_net, inputs, rounds=1, budget_s=0)["rounds"] == 1  # at least one round
    assert torch.equal(torch.random.get_rng_state(), state)  # its dropout drew nothing from the run's stream
    with pytest.raises(ConfigError, match="rounds"):
        P.measure_bf16(net, torch.randn(2, 1, 8, 8), rounds=0)


def test_nested_outputs_are_reduced():
    class Nested(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return {"heads": (self.fc(x), [self.fc(x) * 2]), "ids": torch.zeros(2, dtype=torch.long)}

    assert P.measure_bf16(Nested(), torch.randn(2, 4), rounds=1)["fp32_ms"] > 0


def test_the_probe_batch_leaves_the_shuffle_alone():
    import lightning_eff.cli as cli

    class Shuffled(UserData):  # a RandomSampler draws its seed from torch's stream when the iterator starts
        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=8, shuffle=True)

    data = Shuffled()
    state = torch.random.get_rng_state()
    inputs = cli._train_inputs(data)
    assert isinstance(inputs, torch.Tensor) and inputs.dim() == 4
    assert torch.equal(torch.random.get_rng_state(), state)


def _compose_auto(tmp_path, *extra):
    return compose("mobilenet_baseline", ["trainer/precision=auto", "++trainer.fast_dev_run=true", "model=mobilenetv2_tiny",
                                          f"run_dir={tmp_path}", "print_report=false", "report.latency=false",
                                          "report.memory=false", *extra])


@pytest.mark.parametrize("measured,expected", [(FAST, "bf16-mixed"), (SLOW, "32-true")])
def test_cli_resolves_once_and_records_it(tmp_path, monkeypatch, caplog, measured, expected):
    import lightning_eff.cli as cli

    caplog.set_level(logging.INFO, logger="lightning_eff")
    monkeypatch.setattr(P, "cpu_flags", lambda: dict(AMX))  # as if on an AMX machine: auto measures
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen = []

    def measure(net, inputs, channels_last):
        seen.append((type(net).__name__, tuple(inputs.shape), channels_last))
        return measured

    monkeypatch.setattr(cli, "measure_bf16", measure)
    result = run(_compose_auto(tmp_path))
    assert seen == [("EfficientNet", (128, 1, 32, 32), False)]  # the stage's network, a real training batch
    assert result["precision"]["requested"] == "auto" and result["precision"]["resolved"] == expected
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["precision"]["resolved"] == expected and saved["config"]["trainer"]["precision"] == expected
    assert saved["precision"]["facts"]["amx_bf16"] is True and saved["precision"]["measured"] == measured
    assert saved["precision"]["stages"]["fit"]["resolved"] == expected
    text = "\n".join(r.getMessage() for r in caplog.records)  # the CLI's progress lines (ProgressLog: test_progress.py)
    assert f"stage fit (1/1) started: precision {expected}" in text and "stage fit done in" in text
    assert "report: measuring every variant" in text and "run done in" in text


def test_ddp_ranks_take_the_launching_process_decision(monkeypatch):
    import lightning_eff.cli as cli

    monkeypatch.setattr(P, "cpu_flags", lambda: dict(AMX))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("LOCAL_RANK", cli.PRECISION_ENV):
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(cli, "measure_bf16", lambda *a, **k: calls.append(1) or SLOW)
    # the launching process of a 2-process `ddp` run measures once and hands the decision to the ranks it starts
    parent = cli._stage_precision({"precision": "auto", "devices": 2}, UserNet(), UserData(), [], "fit")
    assert parent["resolved"] == "32-true" and parent["decided_by"] == "measurement" and calls == [1]
    handoff = json.loads(os.environ[cli.PRECISION_ENV])
    assert handoff == {"pid": os.getpid(), "stages": {"fit": "32-true"}}
    # after Lightning started the ranks it sets LOCAL_RANK in the launching process too: a later stage's decision could
    # not reach the ranks, so there every process uses the hardware rule (the launcher never reads its own hand-off)
    monkeypatch.setenv("LOCAL_RANK", "0")
    later = cli._stage_precision({"precision": "auto", "devices": 2}, UserNet(), UserData(), [], "fit")
    assert later["resolved"] == "bf16-mixed" and later["decided_by"] == "hardware rule" and calls == [1]
    # a rank Lightning started by re-running the command (another process): the launcher's value, no measurement
    monkeypatch.setenv(cli.PRECISION_ENV, json.dumps({**handoff, "pid": os.getpid() + 1}))
    monkeypatch.setenv("LOCAL_RANK", "1")
    child = cli._stage_precision({"precision": "auto", "devices": 2}, UserNet(), UserData(), [], "fit")
    assert child["resolved"] == "32-true" and child["decided_by"] == "launching process" and calls == [1]
    finetune = cli._stage_precision({"precision": "auto", "devices": 2}, UserNet(), UserData(), [], "finetune")
    assert finetune["resolved"] == "bf16-mixed" and finetune["decided_by"] == "hardware rule"  # as the launcher's
    # a rank of a torchrun/srun group (nothing handed down), or several nodes: the hardware rule, never measured
    monkeypatch.delenv(cli.PRECISION_ENV)
    assert cli._stage_precision({"precision": "auto"}, UserNet(), UserData(), [], "fit")["resolved"] == "bf16-mixed"
    monkeypatch.delenv("LOCAL_RANK")
    assert cli._stage_precision({"precision": "auto", "num_nodes": 2}, UserNet(), UserData(), [])["resolved"] == "bf16-mixed"
    assert calls == [1]


def test_the_saved_config_says_what_each_stage_ran():
    from lightning_eff.cli import _record_precision
    from lightning_eff.stages import Stage

    c = {"trainer": {"precision": "auto"}, "stages": {"teacher": None, "student": {"trainer": {"max_epochs": 1}},
                                                      "qat": {"trainer": {"precision": "32-true"}}}}
    for stage, value in ((Stage("teacher"), "bf16-mixed"), (Stage("student", main=True), "32-true"),
                         (Stage("qat"), "32-true")):
        _record_precision(c, stage, value, "auto")
    assert c["trainer"]["precision"] == "32-true"  # the main stage's, at the root
    assert c["stages"]["teacher"] == {"trainer": {"precision": "bf16-mixed"}}  # inherited auto, resolved otherwise
    assert c["stages"]["student"] == {"trainer": {"max_epochs": 1}} and c["stages"]["qat"]["trainer"]["precision"] == "32-true"


def test_cli_records_each_stage(tmp_path, monkeypatch):
    import lightning_eff.cli as cli

    monkeypatch.setattr(P, "cpu_flags", lambda: dict(AMX))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    layouts = []

    def measure(net, inputs, channels_last):
        layouts.append(channels_last)
        return FAST

    monkeypatch.setattr(cli, "measure_bf16", measure)
    cfg = compose("mobilenet_qat", ["++trainer.fast_dev_run=true", "model=mobilenetv2_tiny", f"run_dir={tmp_path}",
                                    "print_report=false", "report.latency=false", "report.memory=false",
                                    "~callbacks.export", "~stages.finetune.callbacks.export", "~callbacks.ptq",
                                    "~callbacks.weight_only"])
    result = run(cfg)
    assert layouts == [True]  # the float stage trains channels-last, and was measured so; QAT asks for 32-true
    stages = result["precision"]["stages"]
    assert stages["fit"]["resolved"] == "bf16-mixed" and stages["fit"]["measured"] == FAST
    assert stages["finetune"] == {"requested": "32-true", "resolved": "32-true", "facts": stages["fit"]["facts"]}
    assert result["precision"]["resolved"] == "bf16-mixed"  # the main stage's
    saved = json.loads((tmp_path / "results.json").read_text())["config"]
    assert saved["stages"]["fit"]["trainer"]["precision"] == "bf16-mixed"
    assert saved["stages"]["finetune"]["trainer"]["precision"] == "32-true"


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
