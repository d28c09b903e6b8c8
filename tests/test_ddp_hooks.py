"""Gradient-communication hooks (``lightning_eff.training.ddp``) and the DDP strategy that registers them.

Fast tests check the configuration errors and :func:`multirun_strategy`. One ``ddp``/``slow`` test starts
2 CPU processes (gloo) once and checks everything that needs a real process group in them:

* the Trainer-free core: with each hook the averaged gradients are what that hook computes, bit for bit
  (``fp16``/``bf16``: the bucket cast down, halved, summed in that type and cast back, which differs from
  the exact float32 average in the low bits; ``powersgd``: after ``start_powerSGD_iter`` plain
  iterations every weight gradient has rank ``matrix_approximation_rank``), and DDP names the hook;
* the Lightning strategy, with the ranks started outside Lightning as torchrun starts them: each hook is
  registered on CPU (Lightning's own ``DDPStrategy(ddp_comm_hook=...)`` is not: the negative control), runs
  every step, and a short training ends at the loss of the run without a hook, within a tolerance.
"""
from __future__ import annotations

import inspect
import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from lightning_eff.errors import ConfigError
from lightning_eff.strategies import DDPStrategy, multirun_strategy
from lightning_eff.training.ddp import (
    COMM_HOOKS,
    POWERSGD_OPTIONS,
    check_comm_hook,
    comm_hook_name,
    register_comm_hook,
)

WORLD = 2
STEPS = 20
POWERSGD = {"matrix_approximation_rank": 1, "start_powerSGD_iter": 2}
POWERSGD_FIT = {"matrix_approximation_rank": 2, "start_powerSGD_iter": 2}
_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
                 "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_JOB_NAME")


# ------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("name, options, match", [
    ("fp17", None, r"comm_hook='fp17' is not supported; choose one of \['none', 'fp16', 'bf16', 'powersgd'\]\. Did you mean 'fp16'\?"),
    (3, None, r"comm_hook=3 is not supported"),
    ("fp16", {"matrix_approximation_rank": 2}, r"comm_hook='fp16' takes no options"),
    ("powersgd", {"matrix_rank": 2}, r"comm_hook_options\.matrix_rank=2 is not a powersgd option.*Did you mean 'matrix_approximation_rank'\?"),
    ("powersgd", {"matrix_approximation_rank": 0}, r"comm_hook_options\.matrix_approximation_rank=0 is out of range"),
    ("powersgd", {"use_error_feedback": "yes"}, r"comm_hook_options\.use_error_feedback='yes' must be true or false"),
    ("powersgd", {"start_powerSGD_iter": 1}, r"start_powerSGD_iter=1 must be at least 2 while use_error_feedback or warm_start"),
    ("powersgd", [1], r"comm_hook_options=\[1\] must be a mapping"),
])
def test_bad_hook_or_option_is_a_config_error(name, options, match):
    with pytest.raises(ConfigError, match=match):
        check_comm_hook(name, options)
    with pytest.raises(ConfigError, match=match):  # the strategy checks at construction, before any process starts
        DDPStrategy(comm_hook=name, comm_hook_options=options)


def test_good_choices_are_normalised():
    assert check_comm_hook("PowerSGD", {"start_powerSGD_iter": 1, "use_error_feedback": False, "warm_start": False}).name == "powersgd"
    assert {check_comm_hook(n).name for n in COMM_HOOKS} == set(COMM_HOOKS)


def test_powersgd_options_are_torchs():
    """The option table follows ``PowerSGDState``: a torch upgrade that adds or renames one fails here."""
    params = set(inspect.signature(powerSGD_hook.PowerSGDState.__init__).parameters) - {"self", "process_group"}
    assert set(POWERSGD_OPTIONS) == params


@pytest.mark.parametrize("kwargs, match", [
    ({"process_group_backend": "glo"}, r"process_group_backend='glo' is not supported.*Did you mean 'gloo'\?"),
    ({"start_method": "spwan"}, r"start_method='spwan' is not supported.*Did you mean 'spawn'\?"),
    ({"timeout": 0}, r"timeout=0 is out of range"),
    ({"find_unused_parameter": True}, r"unknown argument find_unused_parameter=True.*Did you mean 'find_unused_parameters'\?"),
    ({"comm_hook": "fp16", "ddp_comm_hook": default_hooks.fp16_compress_hook}, r"comm_hook='fp16' and ddp_comm_hook"),
])
def test_strategy_arguments_are_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DDPStrategy(**kwargs)


def test_strategy_passes_ddp_options_and_timeout_through():
    strategy = DDPStrategy(find_unused_parameters=True, static_graph=False, timeout=60)
    assert strategy._ddp_kwargs == {"find_unused_parameters": True, "static_graph": False}
    assert strategy._timeout.total_seconds() == 60 and strategy._start_method == "popen"


def test_register_needs_a_ddp_model():
    with pytest.raises(TypeError, match="needs a DistributedDataParallel model, got Linear"):
        register_comm_hook(nn.Linear(2, 2), "fp16")


@pytest.fixture
def outside_any_launcher(monkeypatch):
    for key in _TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_multirun_strategy_starts_ranks_in_process(outside_any_launcher):
    assert multirun_strategy("ddp")[0] == "ddp_spawn"
    assert multirun_strategy("ddp_find_unused_parameters_true")[0] == "ddp_spawn_find_unused_parameters_true"
    for kept in ("auto", "ddp_spawn", "ddp_fork", "single_device"):
        assert multirun_strategy(kept) == (kept, None)
    original = DDPStrategy(comm_hook="fp16", process_group_backend="gloo")
    spawned, why = multirun_strategy(original)
    assert spawned._start_method == "spawn" and "re-run the sweep" in why
    assert spawned.comm_hook.name == "fp16" and spawned.process_group_backend == "gloo"  # the configuration is kept
    assert original._start_method == "popen"  # a copy: the caller's object is not changed
    already = DDPStrategy(start_method="spawn")
    assert multirun_strategy(already) == (already, None)


def test_multirun_strategy_keeps_ranks_started_outside(outside_any_launcher):
    """Under torchrun (or srun) nothing is re-launched, and spawning there would start devices x devices ranks."""
    outside_any_launcher.setenv("TORCHELASTIC_RUN_ID", "x")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}.items():
        outside_any_launcher.setenv(key, value)
    strategy = DDPStrategy()
    assert multirun_strategy("ddp") == ("ddp", None)
    assert multirun_strategy(strategy) == (strategy, None)


# ------------------------------------------------------------------------------------------ 2 processes
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _data(rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()


def _core_grads(rank: int, name: str, options: dict, backwards: int) -> dict:
    """Gradients DDP leaves after ``backwards`` passes with hook ``name``, plus the exact per-rank ones."""
    torch.manual_seed(0)
    model = _Net()
    ddp = DistributedDataParallel(model)
    state = register_comm_hook(ddp, name, **options)
    x, y = _data(rank, 32)
    for _ in range(backwards):
        ddp.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
    local = _Net()
    local.load_state_dict(model.state_dict())
    nn.functional.cross_entropy(local(x), y).backward()  # this rank's own gradient, not averaged
    mine = [p.grad.detach().clone() for p in local.parameters()]
    gathered = [[torch.empty_like(g) for _ in range(WORLD)] for g in mine]
    for g, out in zip(mine, gathered):
        dist.all_gather(out, g)
    return {"name": comm_hook_name(ddp), "grads": [p.grad.detach().clone() for p in model.parameters()],
            "per_rank": gathered, "iter": getattr(state, "iter", None)}


class _Task(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = _Net()

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class _Probe(L.Callback):
    """What ran: the hook DDP reports at the end of training, and the hooks' call count (PowerSGD's ``iter``)."""

    def on_train_end(self, trainer, pl_module):
        strategy = trainer.strategy
        self.name = comm_hook_name(strategy.model)
        self.iter = getattr(getattr(strategy, "comm_hook_state", None), "iter", None)


def _fit(rank: int, strategy) -> dict:
    x, y = _data(rank, 16 * STEPS)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    task, probe = _Task(), _Probe()
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=STEPS, callbacks=[probe],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)  # each rank already has its own data
    trainer.fit(task, loader)
    ex, ey = _data(99, 256)  # one held-out batch, the same on both ranks
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(task.net(ex), ey))
    return {"name": probe.name, "iter": probe.iter, "loss": loss}


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    for key in [k for k in os.environ if k.startswith(("SLURM_", "LSB_", "JSM_"))]:  # Lightning would pick those first
        del os.environ[key]
    # The ranks are started here, as torchrun starts them: Lightning detects TorchElasticEnvironment, launches
    # nothing and joins the process group that already exists.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      GROUP_WORLD_SIZE="1", TORCHELASTIC_RUN_ID="test", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    out: dict = {"core": {}, "fit": {}}
    for name, options, backwards in (("none", {}, 1), ("fp16", {}, 1), ("bf16", {}, 1), ("powersgd", POWERSGD, 3)):
        out["core"][name] = _core_grads(rank, name, options, backwards)
    strategies = {name: DDPStrategy(comm_hook=name, comm_hook_options=POWERSGD_FIT if name == "powersgd" else None,
                                    process_group_backend="gloo") for name in COMM_HOOKS}
    strategies["lightning_style"] = DDPStrategy(ddp_comm_hook=default_hooks.fp16_compress_hook)
    strategies["lightning_itself"] = L.pytorch.strategies.DDPStrategy(ddp_comm_hook=default_hooks.fp16_compress_hook)
    for key, strategy in strategies.items():
        out["fit"][key] = _fit(rank, strategy)
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def _emulated(per_rank: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``_compress_hook``'s arithmetic by hand: cast, divide by the world size, sum in ``dtype``, cast back."""
    total = per_rank[0].to(dtype) / WORLD
    for g in per_rank[1:]:
        total = total + g.to(dtype) / WORLD
    return total.float()


def _check_compression_hooks_compute_what_they_say(ranks: list[dict]) -> None:
    for r in ranks:
        core = r["core"]
        assert core["none"]["name"] is None
        assert (core["fp16"]["name"], core["bf16"]["name"]) == ("fp16_compress_hook", "bf16_compress_hook")
        for i, per_rank in enumerate(core["none"]["per_rank"]):
            exact = torch.stack(per_rank).mean(0)
            torch.testing.assert_close(core["none"]["grads"][i], exact, rtol=1e-6, atol=1e-7)
            for name, dtype, rtol in (("fp16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 2e-2)):
                got = core[name]["grads"][i]
                assert torch.equal(got, _emulated(per_rank, dtype)), (name, i)  # the hook's arithmetic, bit for bit
                assert not torch.equal(got, exact), (name, i)  # ... which is not the float32 average
                torch.testing.assert_close(got, exact, rtol=rtol, atol=rtol * float(exact.abs().max()))


def _check_powersgd_sends_low_rank_gradients(ranks: list[dict]) -> None:
    for r in ranks:
        core = r["core"]["powersgd"]
        assert core["name"] == "powerSGD_hook" and core["iter"] == 3
        weights = [g for g in core["grads"] if g.dim() == 2]
        assert weights and all(int(torch.linalg.matrix_rank(g)) == POWERSGD["matrix_approximation_rank"] for g in weights)
        exact = [torch.stack(p).mean(0) for p in r["core"]["none"]["per_rank"]]
        assert all(int(torch.linalg.matrix_rank(g)) > 1 for g in exact if g.dim() == 2)  # what plain all-reduce sends
    for a, b in zip(ranks[0]["core"]["powersgd"]["grads"], ranks[1]["core"]["powersgd"]["grads"]):
        assert torch.equal(a, b)  # every rank steps with the same approximation


def _check_strategy_registers_every_hook_on_cpu_and_trains_to_the_same_loss(ranks: list[dict]) -> None:
    fit = ranks[0]["fit"]
    assert fit["none"]["name"] is None
    assert fit["fp16"]["name"] == fit["lightning_style"]["name"] == "fp16_compress_hook"
    assert fit["bf16"]["name"] == "bf16_compress_hook" and fit["powersgd"]["name"] == "powerSGD_hook"
    assert fit["powersgd"]["iter"] == STEPS  # the hook ran at every step
    assert fit["lightning_itself"]["name"] is None  # the negative control: Lightning drops the hook on CPU
    reference = fit["none"]["loss"]
    assert reference < 0.9  # it learned something (chance: ln 4 = 1.39)
    # measured (torch 2.14.1): fp16 +2e-6, bf16 +7e-4, PowerSGD rank 2 +1.5% relative to the run without a hook
    for key, tolerance in (("fp16", 1e-4), ("bf16", 5e-3), ("lightning_style", 1e-4), ("powersgd", 0.05)):
        assert fit[key]["loss"] != reference, key  # the hook changed the arithmetic of the training ...
        assert abs(fit[key]["loss"] - reference) <= tolerance * reference, (key, fit[key]["loss"], reference)  # ... a little
    for key in fit:
        assert ranks[1]["fit"][key]["loss"] == pytest.approx(fit[key]["loss"], rel=1e-6), key  # the ranks stayed in step


@pytest.mark.ddp
@pytest.mark.slow
def test_hooks_on_two_gloo_processes(tmp_path):
    """One start of 2 ranks for all the checks below (one test, not three: xdist would start them once per worker)."""
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    _check_compression_hooks_compute_what_they_say(ranks)
    _check_powersgd_sends_low_rank_gradients(ranks)
    _check_strategy_registers_every_hook_on_cpu_and_trains_to_the_same_loss(ranks)
