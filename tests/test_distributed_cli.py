"""DDP from ``train.py``: the distributed presets, the README's Trainer commands, and real multi-process runs.

Fast: every README command that sets a Trainer argument composes, validates and (on CPU) builds its Trainer
as written; the presets build the strategy they promise; ``multinode`` reads its sizes from torchrun / SLURM.
Slow (subprocesses of ``train.py``): a 2-process CPU run prints neither Lightning's ``sync_dist`` warnings
nor the profiler's kineto lines and registers its comm hook; a local submitit multirun of 2 jobs; a 2-job
multirun with DDP that runs each job once. (Ranks started by torchrun are covered in ``tests/test_ddp_hooks.py``,
which starts them the way torchrun does; ``torchrun --standalone --nproc-per-node 2 train.py ...
trainer/distributed=multinode trainer.accelerator=cpu`` was run by hand: 15 s, results.json written once.)
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import needs_fmnist
from omegaconf import OmegaConf

from lightning_eff.cli import REPO_ROOT, _trainer, build, compose, validate_config
from lightning_eff.errors import ConfigError
from lightning_eff.strategies import DDPStrategy

README = REPO_ROOT / "README.md"
# A few seconds of real work per process: tiny model, a few batches, cheap report.
QUICK = ["model=mobilenetv2_tiny", "++trainer.max_epochs=1", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
         "++trainer.limit_test_batches=1", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
         "++data.limit_train=256", "++data.limit_val=64", "++data.limit_test=64", "++data.batch_size=32",
         "++report.repeats=1", "++report.batch_sizes=[1]", "++report.latency=false"]
_LAUNCHER_ENV = ("LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "NUM_NODES", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES")


# ------------------------------------------------------------------------------------------ the README
def _readme_commands() -> list[tuple[list[str], str | None]]:
    """``(tokens, expected error)`` of every README command or inline fragment that sets a ``trainer`` option.

    Commands come from code blocks (continuation lines joined, comments dropped); a command followed by a
    ``Configuration error: ...`` line must fail with that message. Inline spans count when they are
    overrides (``trainer.devices=4``), not when they name a placeholder (``trainer.devices=N``).
    """
    text = README.read_text()
    found: list[tuple[list[str], str | None]] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL):
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            line = line.split(" # ")[0].strip().removeprefix("$ ")
            if "train.py" not in line:
                continue
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            error = nxt.removeprefix("Configuration error: ") if nxt.startswith("Configuration error: ") else None
            found.append((shlex.split(line.split("train.py", 1)[1]), error))
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
        if "trainer" not in span:
            continue
        tokens = shlex.split(span.split("train.py", 1)[-1])
        if tokens and all("=" in t for t in tokens) and not any(re.fullmatch(r"[A-Z]+", t.split("=", 1)[1]) for t in tokens):
            found.append((tokens, None))
    return [(tokens, error) for tokens, error in found if any(re.match(r"\+*trainer[./]", t) for t in tokens)]


def _overrides(tokens: list[str]) -> tuple[str, list[str]]:
    """The recipe and the Hydra overrides of a command line (a sweep list runs its first value; hydra.* left out)."""
    recipe, out = "mobilenet_baseline", []
    for token in tokens:
        if token.startswith("-") or "=" not in token or re.match(r"\+*hydra[./]", token):
            continue
        key, value = token.split("=", 1)
        if key == "+recipe":
            recipe = value
            continue
        if "," in value and not value.startswith(("[", "{")):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return recipe, out


README_COMMANDS = _readme_commands()


def cfg_container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def test_the_readme_shows_trainer_commands():
    joined = [" ".join(t) for t, _ in README_COMMANDS]
    assert any("trainer.strategy=ddp" in c for c in joined) and any("trainer/distributed=multinode" in c for c in joined)
    assert any(e is not None for _, e in README_COMMANDS)  # the documented error example is among them


@pytest.mark.parametrize("tokens, error", README_COMMANDS, ids=[" ".join(t)[:80] for t, _ in README_COMMANDS])
def test_readme_trainer_commands_work_as_written(tokens, error, tmp_path, monkeypatch):
    for key in _LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    recipe, overrides = _overrides(tokens)
    cfg = compose(recipe, overrides)
    if error is not None:  # the README shows this command failing, with this message
        with pytest.raises(ConfigError, match=re.escape(error).replace(r"\[\.\.\.\]", ".*")):
            validate_config(cfg)
        return
    validate_config(cfg)
    trainer_cfg = dict(cfg_container(cfg)["trainer"])
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, dict):
        built = build(strategy, "trainer.strategy")  # a bad comm hook or option fails here, on any machine
        hook = next((t.split("=", 1)[1] for t in tokens if t.startswith("trainer.strategy.comm_hook=")), "none")
        assert isinstance(built, DDPStrategy) and built.comm_hook.name == hook
    if trainer_cfg.get("accelerator") == "cpu":  # a GPU command cannot build its Trainer here
        trainer = _trainer(trainer_cfg, [], tmp_path, multirun=False)
        if strategy == "ddp":
            assert type(trainer.strategy) is L.pytorch.strategies.DDPStrategy and trainer.strategy._start_method == "popen"


def test_strategy_is_a_trainer_key(tmp_path):
    """``trainer.strategy=ddp`` without ``+`` (it used to fail with "Key 'strategy' is not in struct")."""
    cfg = compose("mobilenet_baseline", ["trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    validate_config(cfg)
    trainer = _trainer(dict(cfg_container(cfg)["trainer"]), [], tmp_path, multirun=False)
    assert isinstance(trainer.strategy, L.pytorch.strategies.DDPStrategy) and trainer.strategy.num_processes == 2


# ------------------------------------------------------------------------------------------ the presets
def test_ddp_cpu_preset_builds_our_strategy_with_gloo_and_the_hook(tmp_path):
    cfg = compose("mobilenet_baseline", ["trainer/distributed=ddp_cpu", "trainer.strategy.comm_hook=powersgd",
                                         "+trainer.strategy.comm_hook_options.start_powerSGD_iter=10"])
    validate_config(cfg)
    trainer = _trainer(dict(cfg_container(cfg)["trainer"]), [], tmp_path, multirun=False)
    strategy = trainer.strategy
    assert isinstance(strategy, DDPStrategy) and strategy.num_processes == 2 and strategy.root_device.type == "cpu"
    assert strategy.process_group_backend == "gloo" and strategy._start_method == "popen"
    assert (strategy.comm_hook.name, strategy.comm_hook.options) == ("powersgd", {"start_powerSGD_iter": 10})


def test_a_bad_comm_hook_on_the_command_line_is_a_config_error(tmp_path):
    cfg = compose("mobilenet_baseline", ["trainer/distributed=ddp_cpu", "trainer.strategy.comm_hook=fp61"])
    with pytest.raises(ConfigError, match=r"trainer.strategy: comm_hook='fp61' is not supported.*Did you mean 'fp16'\?"):
        _trainer(dict(cfg_container(cfg)["trainer"]), [], tmp_path, multirun=False)


def test_ddp_gpu_preset():
    trainer = cfg_container(compose("mobilenet_baseline", ["trainer/distributed=ddp_gpu"]))["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["num_nodes"]) == ("gpu", "auto", 1)
    assert build(trainer["strategy"], "trainer.strategy").process_group_backend == "nccl"


@pytest.mark.parametrize("env, devices, nodes", [
    ({}, "auto", 1),
    ({"LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "3"}, 4, 3),                 # torchrun --nnodes 3 --nproc-per-node 4
    ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2"}, 8, 2),               # srun --nodes 2 --ntasks-per-node 8
    ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "NUM_NODES": "5"}, 8, 5),  # NUM_NODES wins
])
def test_multinode_preset_reads_the_launcher(env, devices, nodes, monkeypatch):
    for key in _LAUNCHER_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose("mobilenet_baseline", ["trainer/distributed=multinode"])
    validate_config(cfg)
    trainer = cfg_container(cfg)["trainer"]
    assert (trainer["devices"], trainer["num_nodes"]) == (devices, nodes)
    assert isinstance(build(trainer["strategy"], "trainer.strategy"), DDPStrategy)


def test_slurm_launcher_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra: pip install -e '.[slurm]'")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.max_num_timeout) == (4, 4, 0)


# ------------------------------------------------------------------------------------------ real runs
def _train(args: list[str], timeout: int = 300, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), "train.py", *args]
    return subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**_clean_env(), "HYDRA_FULL_ERROR": "1"})


def _clean_env() -> dict[str, str]:
    """This process's environment without a launcher's variables (the test may itself run under one)."""
    drop = set(_LAUNCHER_ENV) | {"RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR",
                                 "MASTER_PORT", "KINETO_LOG_LEVEL"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "LSB_", "JSM_"))}


def _assert_clean(output: str) -> None:
    assert "sync_dist=True" not in output, "Lightning's sync_dist warning is back"
    assert "gpuGetDeviceCount" not in output and "USDT:" not in output, "kineto's own lines are back"


@pytest.mark.heavy
@needs_fmnist
@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_cpu_run_is_clean_and_uses_its_hook(tmp_path):
    out = _train(["+recipe=mobilenet_baseline", "trainer/distributed=ddp_cpu", "trainer.strategy.comm_hook=fp16", *QUICK,
                  f"hydra.run.dir={tmp_path}"])
    output = out.stdout + out.stderr
    assert out.returncode == 0, output[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert "DDPStrategy: gradient communication hook fp16_compress_hook registered (cpu, gloo)." in output
    _assert_clean(output)
    results = json.loads((tmp_path / "results.json").read_text())
    row = results["report"]["fp32"] if isinstance(results["report"], dict) else results["report"][0]
    assert results["metrics"]["footprint/params"] == row["params"]  # the synced (max) value is the value
    assert row["peak_mem_mb"] is not None  # the profiler did measure, quietly


@pytest.mark.heavy
@needs_fmnist
@pytest.mark.slow
def test_local_submitit_multirun_of_two_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra: pip install -e '.[slurm]'")
    out = _train(["-m", "hydra/launcher=submitit_local", "+recipe=mobilenet_baseline", "++trainer.fast_dev_run=true",
                  "test_after_fit=false", "optimized_metric=val/acc", *QUICK, "seed=0,1", f"hydra.sweep.dir={tmp_path}"])
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    seeds = [json.loads((tmp_path / str(job) / "results.json").read_text())["config"]["seed"] for job in (0, 1)]
    assert seeds == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["0", "1"]


@pytest.mark.heavy
@needs_fmnist
@pytest.mark.slow
@pytest.mark.ddp
def test_multirun_with_ddp_runs_each_job_once(tmp_path):
    # no test stage: with spawn every trainer.fit/test starts both ranks afresh, and one start per job is the point here
    out = _train(["-m", "+recipe=mobilenet_baseline", "trainer/distributed=ddp_cpu", "trainer.strategy.comm_hook=fp16",
                  "++trainer.fast_dev_run=true", "test_after_fit=false", "optimized_metric=val/acc", *QUICK, "seed=0,1",
                  f"hydra.sweep.dir={tmp_path}"])
    output = out.stdout + out.stderr
    assert out.returncode == 0, output[-3000:]
    assert output.count("Launching 2 jobs locally") == 1  # the sweep started once: no rank re-ran it
    assert output.count("fp16_compress_hook registered") == 2  # each job's ranks kept the comm hook
    assert sorted(p.name for p in Path(tmp_path).iterdir() if p.name.isdigit()) == ["0", "1"]
    for job in (0, 1):
        assert json.loads((tmp_path / str(job) / "results.json").read_text())["config"]["seed"] == job
    _assert_clean(output)
