"""The one timing harness every latency figure goes through (reports, callbacks, benchmarks).

:func:`time_interleaved` times zero-argument callables (a model call, one optimizer step, a
whole fit) **interleaved in rounds**: every variant gets ``warmup`` untimed calls first, then in
each round every variant runs ``repeats`` timed calls in turn (round-robin, the starting variant
rotating from round to round), so drift and a neighbour's bursts hit every variant alike. The
thread count is fixed during timing and restored afterwards. Per variant it records the minimum
(contention only ever adds time, so the minimum is the best estimate of a variant's own cost),
the median over all timed calls, and the **spread**:

    spread = (max_r m_r - min_r m_r) / min_r m_r,   m_r = the variant's fastest call in round r

i.e. the relative range of the per-round minima: how far the rounds disagree. A variant whose
spread exceeds ``max_spread`` (default :data:`DEFAULT_MAX_SPREAD` = 0.15, i.e. rounds more than
15% apart) is flagged ``noisy``; so is one timed in a single round (one round cannot show that
rounds agree; its spread is ``nan``). :func:`time_models` is the same for models called on
example inputs (eval mode and ``no_grad`` for the duration, each module's mode restored);
:func:`train_step_fn` builds the zero-argument callable of one training step.

:func:`measure_latency`, :func:`interleaved_times`, :func:`interleaved_min_ms` and
:func:`measure_latencies` keep their signatures and delegate to the same timer.

Example:
    >>> calls = []
    >>> timing = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
    ...                           rounds=2, repeats=1, warmup=1, threads=1)
    >>> calls  # one warm-up call each, then round 1 (a, b), round 2 (b, a)
    ['a', 'b', 'a', 'b', 'b', 'a']
    >>> sorted(timing), timing["a"].rounds, timing["a"].min_ms <= timing["a"].median_ms
    (['a', 'b'], 2, True)
    >>> net = nn.Linear(4, 2)
    >>> timing = time_models({"net": net}, torch.zeros(1, 4), rounds=2, repeats=2, warmup=1)
    >>> sorted(timing.rows()["net"])
    ['median_ms', 'min_ms', 'noisy', 'repeats', 'round_min_ms', 'rounds', 'spread']
    >>> step = train_step_fn(net, torch.zeros(8, 4), torch.zeros(8, dtype=torch.long))
    >>> time_interleaved({"step": step}, rounds=2, repeats=1, warmup=0)["step"].repeats
    1
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_eff.batch import call_with_inputs, first_tensor, resize_batch
from lightning_eff.errors import ConfigError
from lightning_eff.validation import check_int, check_number

__all__ = [
    "DEFAULT_MAX_SPREAD", "VariantTiming", "TimingResult", "time_interleaved", "time_models", "train_step_fn",
    "inference", "num_threads", "measure_latency", "interleaved_times", "interleaved_min_ms", "measure_latencies",
]

log = logging.getLogger(__name__)
_MiB = float(2**20)

#: Rounds whose per-round minima are more than 15% apart (relative to the fastest) make a variant ``noisy``.
DEFAULT_MAX_SPREAD = 0.15

#: The statistics a :class:`VariantTiming` offers for ratios.
STATS = ("min_ms", "median_ms")


@contextlib.contextmanager
def inference(model: Any) -> Iterator[None]:
    """eval() + no_grad, restoring every submodule's own mode afterwards (a frozen teacher stays eval)."""
    # (a frozen TorchScript module has no ``training`` attribute left to switch)
    modes = [(m, m.training) for m in model.modules() if hasattr(m, "training")] if isinstance(model, nn.Module) else []
    for module, _ in modes:
        module.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (None keeps the current count); restored afterwards."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class VariantTiming:
    """One variant's figures from :func:`time_interleaved` (milliseconds per call).

    Attributes:
        min_ms: fastest timed call.
        median_ms: median over all ``rounds * repeats`` timed calls.
        spread: relative range of the per-round minima, ``(max - min) / min`` (``nan`` with one round).
        rounds: rounds timed.
        repeats: consecutive timed calls per round.
        noisy: ``spread > max_spread`` (or a single round): the rounds do not agree, so a figure
            from this variant must not be reported as a clean one.
        round_min_ms: the fastest call of each round, in round order.
        times_ms: every timed call, round by round.
    """

    min_ms: float
    median_ms: float
    spread: float
    rounds: int
    repeats: int
    noisy: bool
    round_min_ms: tuple[float, ...] = field(repr=False)
    times_ms: tuple[float, ...] = field(repr=False)

    def row(self) -> dict[str, Any]:
        """The JSON row: ``min_ms``, ``median_ms``, ``spread``, ``noisy``, ``rounds``, ``repeats``, ``round_min_ms``."""
        spread = None if math.isnan(self.spread) else round(self.spread, 4)
        return {"min_ms": round(self.min_ms, 4), "median_ms": round(self.median_ms, 4), "spread": spread, "noisy": self.noisy,
                "rounds": self.rounds, "repeats": self.repeats, "round_min_ms": [round(t, 4) for t in self.round_min_ms]}


@dataclass(frozen=True)
class TimingResult(Mapping[str, VariantTiming]):
    """The result of one :func:`time_interleaved` run: a read-only mapping ``name -> VariantTiming``.

    Attributes:
        variants: the per-variant figures, in the order given.
        max_spread: the threshold the ``noisy`` flags were judged with.
        threads: the torch thread count during timing.
        warmup: untimed calls per variant before the first round.
    """

    variants: dict[str, VariantTiming]
    max_spread: float
    threads: int
    warmup: int

    def __getitem__(self, name: str) -> VariantTiming:
        try:
            return self.variants[name]
        except KeyError:
            raise KeyError(f"no variant {name!r} in this timing; variants are {list(self.variants)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.variants)

    def __len__(self) -> int:
        return len(self.variants)

    @property
    def noisy(self) -> bool:
        """Whether any variant is noisy."""
        return any(v.noisy for v in self.variants.values())

    @property
    def noisy_variants(self) -> list[str]:
        """Names of the noisy variants, in order."""
        return [name for name, v in self.variants.items() if v.noisy]

    def stat(self, stat: str = "min_ms") -> dict[str, float]:
        """``{name: figure}`` for ``stat`` (``"min_ms"`` or ``"median_ms"``)."""
        _check_stat(stat)
        return {name: getattr(v, stat) for name, v in self.variants.items()}

    def ratio(self, numerator: str, denominator: str, stat: str = "min_ms") -> float:
        """``numerator``'s ``stat`` over ``denominator``'s (e.g. the int8 model's minimum over the float one's)."""
        _check_stat(stat)
        return getattr(self[numerator], stat) / getattr(self[denominator], stat)

    def rows(self) -> dict[str, dict[str, Any]]:
        """``{name: VariantTiming.row()}``: what a benchmark writes to its JSON."""
        return {name: v.row() for name, v in self.variants.items()}


def _check_stat(stat: str) -> None:
    if stat not in STATS:
        raise ConfigError(f"stat={stat!r} is not supported; choose one of {list(STATS)}.")


def _no_sync() -> None:
    return None


def _default_sync() -> Callable[[], None]:
    """``torch.cuda.synchronize`` once CUDA is in use (so queued kernels are inside the timed call), else nothing."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return _no_sync


def _spread(round_min: Sequence[float]) -> float:
    if len(round_min) < 2:
        return math.nan
    low = min(round_min)
    return (max(round_min) - low) / low if low > 0 else (0.0 if max(round_min) == low else math.inf)


def time_interleaved(
    variants: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 5,
    repeats: int = 3,
    warmup: int = 2,
    threads: int | None = None,
    max_spread: float = DEFAULT_MAX_SPREAD,
    contexts: Mapping[str, Callable[[], contextlib.AbstractContextManager]] | None = None,
    rotate: bool = True,
    sync: Callable[[], Any] | None = None,
) -> TimingResult:
    """Time zero-argument callables interleaved in rounds (see the module docstring).

    Order: ``warmup`` untimed calls of each variant; then ``rounds`` rounds, in each of which every
    variant runs ``repeats`` timed calls back to back, variant after variant; with ``rotate`` the
    first variant of round ``r`` is variant ``r mod n`` (no variant always runs first, right after
    another one's working set). A callable may be anything: a forward pass, one optimizer step
    (:func:`train_step_fn`), a whole fit; it is called as is (no ``eval``, no ``no_grad``: see
    :func:`time_models` for models).

    Args:
        variants: ``{name: callable}``, at least one.
        rounds: rounds (2 or more to judge the spread; one round is always ``noisy``).
        repeats: timed calls per variant per round.
        warmup: untimed calls per variant before the first round (allocator, oneDNN primitive
            caches, TorchScript's profiling executor, lazy init).
        threads: ``torch.set_num_threads`` during warm-up and timing (None keeps the current
            count); the previous count is restored afterwards.
        max_spread: a variant whose spread (relative range of its per-round minima) exceeds this
            is ``noisy``.
        contexts: optional ``{name: factory}`` of context managers entered around each block of
            a variant's calls (its warm-up, and its ``repeats`` calls of each round), outside the
            timed region: e.g. ``lambda: quantized_engine("qnnpack")``.
        rotate: rotate the starting variant from round to round (default True).
        sync: called before and after every timed call (default ``torch.cuda.synchronize`` when
            CUDA is initialised, else nothing).

    Returns:
        :class:`TimingResult`: ``min_ms``, ``median_ms``, ``spread``, ``noisy`` per variant.

    Raises:
        ConfigError: no variants, a variant that is not callable, ``rounds < 1``, ``repeats < 1``,
            ``warmup < 0``, ``threads < 1``, ``max_spread < 0``, or a ``contexts`` name that is no variant.
    """
    if not isinstance(variants, Mapping) or not variants:
        raise ConfigError(f"variants={variants!r} must be a non-empty mapping {{name: zero-argument callable}}.")
    for name, fn in variants.items():
        if not callable(fn):
            raise ConfigError(f"variants[{name!r}]={fn!r} is not callable; give a zero-argument callable.")
    check_int("rounds", rounds, low=1)
    check_int("repeats", repeats, low=1)
    check_int("warmup", warmup, low=0)
    check_int("threads", threads, low=1, allow_none=True)
    check_number("max_spread", max_spread, low=0.0)
    contexts = dict(contexts or {})
    unknown = sorted(set(contexts) - set(variants))
    if unknown:
        raise ConfigError(f"contexts={unknown} name no variant; variants are {list(variants)}.")
    sync = sync or _default_sync()
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter

    def block(name: str) -> contextlib.AbstractContextManager:
        return contexts[name]() if name in contexts else contextlib.nullcontext()

    with num_threads(threads):
        used_threads = torch.get_num_threads()
        for name in names:
            fn = variants[name]
            with block(name):
                for _ in range(warmup):
                    fn()
                sync()
        for r in range(rounds):
            shift = r % len(names) if rotate else 0
            for name in names[shift:] + names[:shift]:
                fn, out = variants[name], times[name]
                with block(name):
                    for _ in range(repeats):
                        sync()
                        start = clock()
                        fn()
                        sync()
                        out.append((clock() - start) * 1000.0)
    result = {}
    for name in names:
        ms = times[name]
        round_min = tuple(min(ms[i : i + repeats]) for i in range(0, len(ms), repeats))
        spread = _spread(round_min)
        result[name] = VariantTiming(min_ms=min(ms), median_ms=float(statistics.median(ms)), spread=spread, rounds=rounds,
                                     repeats=repeats, noisy=bool(math.isnan(spread) or spread > max_spread),
                                     round_min_ms=round_min, times_ms=tuple(ms))
    noisy = [n for n, v in result.items() if v.noisy]
    if noisy and rounds > 1:
        log.info("timing: rounds disagree by more than %.0f%% for %s (spread %s)", 100 * max_spread, noisy,
                 {n: round(result[n].spread, 3) for n in noisy})
    return TimingResult(variants=result, max_spread=float(max_spread), threads=used_threads, warmup=warmup)


def time_models(
    models: Mapping[str, Callable[..., Any]],
    example_inputs: Any,
    **kwargs: Any,
) -> TimingResult:
    """:func:`time_interleaved` of ``model(example_inputs)`` for each model, in eval mode under ``no_grad``.

    Every model sees the same inputs (tuple -> ``*args``, dict -> ``**kwargs``, anything else one
    argument); each submodule's own mode is restored afterwards. Works for ``nn.Module``,
    TorchScript modules, loaded artifacts and any callable. CUDA work is synchronized when the
    inputs are on a GPU. ``kwargs`` are those of :func:`time_interleaved`.
    """
    if not isinstance(models, Mapping) or not models:
        raise ConfigError(f"models={models!r} must be a non-empty mapping {{name: model}}.")
    tensor = first_tensor(example_inputs)
    if "sync" not in kwargs:
        kwargs["sync"] = torch.cuda.synchronize if tensor is not None and tensor.is_cuda else _no_sync
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(inference(model))
        calls = {name: functools.partial(call_with_inputs, model, example_inputs) for name, model in models.items()}
        return time_interleaved(calls, **kwargs)


def train_step_fn(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[], float]:
    """A zero-argument callable doing one training step of ``model`` on a fixed batch, for :func:`time_interleaved`.

    The model is put in train mode; each call runs forward, ``loss_fn(output, targets)`` (default
    cross-entropy), ``zero_grad``, backward and ``optimizer.step()`` (default SGD, lr 1e-3) and
    returns the loss as a float.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model={type(model).__name__} must be an nn.Module to train.")
    model.train()
    opt = optimizer if optimizer is not None else torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_of = loss_fn if loss_fn is not None else nn.functional.cross_entropy

    def step() -> float:
        loss = loss_of(call_with_inputs(model, inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def measure_latency(
    fn_or_model: Callable[..., Any],
    example_inputs: Any,
    *,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> float:
    """Median wall-clock milliseconds of one call, after ``warmup`` untimed calls.

    The median resists the odd slow run (page faults, a neighbour process); a fixed thread count
    makes numbers comparable across variants, and the previous count is restored afterwards.
    Works for ``nn.Module``, TorchScript modules and any callable. CUDA work is synchronized.
    (:func:`time_models` with one model and ``repeats`` rounds of one call; for comparisons,
    time the variants together with :func:`time_models`.)

    Args:
        fn_or_model: the model or function to time.
        example_inputs: its inputs (tuple -> ``*args``, dict -> ``**kwargs``, else one argument).
        warmup: untimed calls first (allocator, oneDNN primitive caches, lazy init).
        repeats: timed calls; the median is returned.
        threads: ``torch.set_num_threads`` value during the measurement (None keeps the current).

    Raises:
        ConfigError: ``warmup < 0``, ``repeats < 1`` or ``threads < 1``.
    """
    check_int("warmup", warmup, low=0)
    check_int("repeats", repeats, low=1)
    check_int("threads", threads, low=1, allow_none=True)
    timing = time_models({"model": fn_or_model}, example_inputs, rounds=repeats, repeats=1, warmup=warmup, threads=threads)
    return timing["model"].median_ms


def interleaved_times(models: Mapping[str, Callable[..., Any]], example_inputs: Any, repeats: int = 15,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds of every call of each model, the calls interleaved (a, b, then b, a, ...).

    For *ratios* between variants on a shared CPU: a neighbour's burst hits every variant alike,
    and contention only ever adds time, so the minimum estimates a model's own cost best (see
    :func:`interleaved_min_ms`). ``warmup`` untimed calls each first; submodule modes are restored.
    (:func:`time_models` with ``repeats`` rounds of one call.)
    """
    check_int("repeats", repeats, low=1)
    check_int("warmup", warmup, low=0)
    timing = time_models(models, example_inputs, rounds=repeats, repeats=1, warmup=warmup)
    return {name: list(v.times_ms) for name, v in timing.items()}


def interleaved_min_ms(models: Mapping[str, Callable[..., Any]], example_inputs: Any, repeats: int = 15) -> dict[str, float]:
    """Minimum milliseconds per call of each model over :func:`interleaved_times` (one warm-up call each)."""
    return {name: min(ms) for name, ms in interleaved_times(models, example_inputs, repeats).items()}


def measure_latencies(
    model: Callable[..., Any],
    make_inputs: Callable[[int], Any] | Any,
    batch_sizes: Sequence[int] = (1, 32),
    **kwargs: Any,
) -> dict[int, float]:
    """:func:`measure_latency` per batch size; ``make_inputs(batch)`` builds the inputs.

    ``make_inputs`` may also be an example batch, resized with :func:`resize_batch`.
    """
    build = make_inputs if callable(make_inputs) else (lambda batch: resize_batch(make_inputs, batch))
    return {int(batch): measure_latency(model, build(int(batch)), **kwargs) for batch in batch_sizes}
