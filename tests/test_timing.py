"""The one interleaved timer (issue 15, item 6): call order, statistics, threads, the noisy flag, the RESULT line."""
from __future__ import annotations

import contextlib
import json
import math
import time

import pytest
import torch
from torch import nn

from lightning_eff.bench.common import (
    Timings,
    format_result_line,
    mark_noisy,
    write_bench,
)
from lightning_eff.errors import ConfigError
from lightning_eff.measure import (
    DEFAULT_MAX_SPREAD,
    TimingResult,
    VariantTiming,
    interleaved_min_ms,
    interleaved_times,
    measure_latency,
    time_interleaved,
    time_models,
    train_step_fn,
)


def recorder(calls: list[str], name: str):
    return lambda: calls.append(name)


def slow_in_odd_rounds(repeats: int, fast_s: float = 0.001, slow_s: float = 0.010):
    """A callable (timed alone) that sleeps ``fast_s`` in even rounds and ``slow_s`` in odd ones."""
    count = {"n": 0}

    def fn() -> None:
        rnd = count["n"] // repeats
        count["n"] += 1
        time.sleep(slow_s if rnd % 2 else fast_s)

    return fn


def test_variants_alternate_round_robin_after_warmup():
    calls: list[str] = []
    variants = {name: recorder(calls, name) for name in "abc"}
    timing = time_interleaved(variants, rounds=3, repeats=2, warmup=1)
    warm = ["a", "b", "c"]
    rounds = [["a", "a", "b", "b", "c", "c"], ["b", "b", "c", "c", "a", "a"], ["c", "c", "a", "a", "b", "b"]]
    assert calls == warm + sum(rounds, [])
    assert list(timing) == ["a", "b", "c"] and len(timing) == 3
    assert all(len(v.times_ms) == 6 and len(v.round_min_ms) == 3 and v.rounds == 3 and v.repeats == 2 for v in timing.values())

    calls.clear()
    time_interleaved(variants, rounds=2, repeats=1, warmup=0, rotate=False)
    assert calls == ["a", "b", "c", "a", "b", "c"]


def test_min_le_median_and_the_rows():
    timing = time_interleaved({"x": lambda: sum(range(200)), "y": lambda: sum(range(400))}, rounds=4, repeats=3, warmup=1)
    assert isinstance(timing, TimingResult) and timing.max_spread == DEFAULT_MAX_SPREAD
    for v in timing.values():
        assert 0 < v.min_ms <= v.median_ms
        assert v.min_ms == min(v.round_min_ms) and v.spread >= 0
        assert v.spread == pytest.approx((max(v.round_min_ms) - min(v.round_min_ms)) / min(v.round_min_ms))
    row = timing.rows()["x"]
    assert set(row) == {"min_ms", "median_ms", "spread", "noisy", "rounds", "repeats", "round_min_ms"}
    assert timing.ratio("x", "y") == pytest.approx(timing["x"].min_ms / timing["y"].min_ms)
    assert timing.ratio("x", "y", "median_ms") == pytest.approx(timing["x"].median_ms / timing["y"].median_ms)


def test_thread_count_fixed_during_timing_and_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []
        timing = time_interleaved({"a": lambda: seen.append(torch.get_num_threads())}, rounds=2, repeats=1, warmup=1, threads=1)
        assert seen == [1, 1, 1] and timing.threads == 1
        assert torch.get_num_threads() == 2

        def boom() -> None:
            raise RuntimeError("variant failed")

        with pytest.raises(RuntimeError, match="variant failed"):
            time_interleaved({"a": boom}, rounds=2, repeats=1, warmup=0, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_rounds_that_disagree_are_noisy():
    repeats = 2
    timing = time_interleaved({"jumpy": slow_in_odd_rounds(repeats)}, rounds=4, repeats=repeats, warmup=0, max_spread=1.0)
    v = timing["jumpy"]
    assert v.noisy and v.spread > 1.0 and timing.noisy and timing.noisy_variants == ["jumpy"]
    assert v.round_min_ms[1] > 5 * v.round_min_ms[0]  # odd rounds slept 10 ms, even ones 1 ms


def test_a_steady_variant_is_not_noisy():
    # a generous threshold: a steady 1 ms sleep cannot have rounds 1000x apart, however busy the machine
    timing = time_interleaved({"steady": lambda: time.sleep(0.001)}, rounds=4, repeats=2, warmup=1, max_spread=1000.0)
    assert not timing["steady"].noisy and not timing.noisy and timing.noisy_variants == []


def test_one_round_cannot_show_agreement():
    timing = time_interleaved({"a": lambda: None}, rounds=1, repeats=3, warmup=0, max_spread=1e9)
    assert math.isnan(timing["a"].spread) and timing["a"].noisy
    assert timing.rows()["a"]["spread"] is None  # JSON has no NaN


def test_contexts_wrap_each_block_outside_the_timed_calls():
    events: list[str] = []

    @contextlib.contextmanager
    def ctx():
        events.append("enter")
        yield
        events.append("exit")

    time_interleaved({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, rounds=2, repeats=2, warmup=1,
                     contexts={"a": ctx})
    assert events == ["enter", "a", "exit", "b",  # warm-up
                      "enter", "a", "a", "exit", "b", "b",  # round 1
                      "b", "b", "enter", "a", "a", "exit"]  # round 2


def test_bad_options_raise_config_error_naming_them():
    with pytest.raises(ConfigError, match="variants"):
        time_interleaved({}, rounds=2)
    with pytest.raises(ConfigError, match=r"variants\['a'\]"):
        time_interleaved({"a": 3}, rounds=2)
    with pytest.raises(ConfigError, match="rounds"):
        time_interleaved({"a": lambda: None}, rounds=0)
    with pytest.raises(ConfigError, match="repeats"):
        time_interleaved({"a": lambda: None}, repeats=0)
    with pytest.raises(ConfigError, match="warmup"):
        time_interleaved({"a": lambda: None}, warmup=-1)
    with pytest.raises(ConfigError, match="threads"):
        time_interleaved({"a": lambda: None}, threads=0)
    with pytest.raises(ConfigError, match="max_spread"):
        time_interleaved({"a": lambda: None}, max_spread=-0.1)
    with pytest.raises(ConfigError, match="contexts"):
        time_interleaved({"a": lambda: None}, contexts={"b": contextlib.nullcontext})
    timing = time_interleaved({"a": lambda: None}, rounds=2, repeats=1, warmup=0)
    with pytest.raises(ConfigError, match="stat='mean'"):
        timing.ratio("a", "a", "mean")


def test_models_and_training_steps_go_through_the_same_timer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()
    timing = time_models({"net": net, "fn": lambda x: x * 2}, torch.zeros(2, 4), rounds=2, repeats=2, warmup=1)
    assert set(timing) == {"net", "fn"} and net.training and net[1].training  # modes restored

    before = net[0].weight.detach().clone()
    step = train_step_fn(net, torch.randn(16, 4), torch.randint(0, 3, (16,)))
    steps = time_interleaved({"step": step}, rounds=2, repeats=2, warmup=1)
    assert len(steps["step"].times_ms) == 4 and not torch.equal(before, net[0].weight)  # 5 optimizer steps ran

    # the legacy entry points delegate to it
    times = interleaved_times({"a": net, "b": net}, torch.zeros(1, 4), repeats=3, warmup=0)
    assert [len(v) for v in times.values()] == [3, 3]
    assert set(interleaved_min_ms({"a": net}, torch.zeros(1, 4), repeats=2)) == {"a"}
    assert measure_latency(net, torch.zeros(1, 4), warmup=0, repeats=2) > 0


def test_result_line_says_noisy_when_a_headline_figure_is(tmp_path, capsys):
    repeats = 2
    timer = Timings()
    timer.time("speed", {"jumpy": slow_in_odd_rounds(repeats), "steady": lambda: time.sleep(0.001)}, rounds=4,
               repeats=repeats, warmup=0, max_spread=1.0, rotate=False)
    assert timer.runs["speed"]["jumpy"].noisy
    result = {"ratio": timer.ratio("ratio", "speed", "jumpy", "steady"), "bytes": 10}
    line = format_result_line(mark_noisy(result, timer))
    assert line.startswith("RESULT ratio=") and line.endswith(" bytes=10 noisy=1")

    path = write_bench("demo", {"rows": {}}, result, out_dir=tmp_path, timings=timer)
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("noisy=1")
    data = json.loads(path.read_text())
    assert data["result"]["noisy"] == 1
    timings = data["details"]["timings"]
    assert timings["noisy_variants"] == ["speed/jumpy"] and timings["noisy_figures"] == {"ratio": ["speed/jumpy"]}
    assert timings["runs"]["speed"]["variants"]["jumpy"]["noisy"] is True
    assert set(timings["runs"]["speed"]["variants"]["steady"]) >= {"min_ms", "median_ms", "spread", "noisy"}

    # a figure from clean variants only reads noisy=0, even when another variant of the run is noisy
    def made(round_min: tuple[float, ...], noisy: bool) -> VariantTiming:
        return VariantTiming(min_ms=min(round_min), median_ms=max(round_min), spread=0.0, rounds=len(round_min), repeats=1,
                             noisy=noisy, round_min_ms=round_min, times_ms=round_min)

    clean = Timings()
    clean.add("speed", TimingResult({"a": made((1.0, 1.01), False), "jumpy": made((1.0, 9.0), True)}, 0.15, 1, 0))
    result = {"t": clean.ratio("t", "speed", "a", "a")}
    assert format_result_line(mark_noisy(result, clean)) == "RESULT t=1 noisy=0"
    assert clean.noisy_variants() == ["speed/jumpy"] and not clean.noisy
    clean.figure("u", 2.0, [("speed", "jumpy")])
    assert format_result_line(mark_noisy({**result, "u": 2.0}, clean)) == "RESULT t=1 u=2 noisy=1"
    assert format_result_line(mark_noisy({**result, "u": None}, clean)) == "RESULT t=1 u=none noisy=0"  # not computed
    with pytest.raises(ConfigError, match="never timed"):
        clean.ratio("r", "other", "a", "a")
    with pytest.raises(ConfigError, match="reserved"):
        mark_noisy({"noisy": 0}, clean)


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_training_efficiency_bench_refuses_a_memory_budget_outside_0_1(value, capsys):
    from lightning_eff.bench.training_efficiency import main

    with pytest.raises(SystemExit):
        main(["--memory-budget", value, "--skip", "ckpt", "bf16", "ddp", "compile"])
    assert f"--memory-budget={float(value)}" in capsys.readouterr().err


def test_training_efficiency_batchnorm_backward_part_times_both_modes_with_two_threads():
    """The bench part behind bn_backward_step_time_ratio: both step variants and the kernel rows, at >= 2 threads."""
    from lightning_eff.bench.common import Timings
    from lightning_eff.bench.training_efficiency import _batchnorm_backward

    before = torch.get_num_threads()
    timer = Timings()
    out = _batchnorm_backward(timer, quick=True, threads=1)
    assert out["threads"] == 2 and out["step_time_ratio"] > 0
    assert set(timer.runs["bn_backward_step"]) == {"native", "auto", "auto_out_of_place"}
    assert out["out_of_place_act_step_time_ratio"] > 0 and out["both_step_time_ratio"] > 0
    for c in ("bn8", "bn24"):
        assert {"nchw", "channels_last", "channels_last_rerouted", "native_vs_nchw"} <= set(out["kernel_ms"][c])
    assert torch.get_num_threads() == before  # the timer puts the thread count back
