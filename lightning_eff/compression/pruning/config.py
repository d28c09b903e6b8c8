"""Validated pruning options and the sparsity schedule they define (a pure function of the step).

Every option is checked when the config is built (RELIABILITY.md: ``amount=1.5``, ``-0.1`` or
``"0.5"`` are refused naming ``amount``; ``amount=1.0`` needs ``allow_full=True``; a schedule
that decreases is refused naming the step), so a Hydra run fails at compose/build time rather
than mid-fit.

Example:
    >>> cfg = PruningConfig(amount=0.75, schedule="polynomial", frequency=10)
    >>> begin, end = cfg.steps(total_steps=100)
    >>> round(cfg.target(40, begin, end), 4), cfg.target(90, begin, end)
    (0.6738, 0.75)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_eff.compression.pruning.distribution import DISTRIBUTIONS
from lightning_eff.compression.pruning.masks import GRANULARITIES, check_block, check_nm
from lightning_eff.compression.pruning.regrowth import REGROWTH
from lightning_eff.compression.pruning.saliency import SALIENCIES
from lightning_eff.compression.pruning.selection import (
    DEFAULT_MODULE_TYPES,
    check_patterns,
)
from lightning_eff.errors import ConfigError
from lightning_eff.schedules import (
    check_sparsity,
    check_sparsity_schedule,
    check_step_or_fraction,
    constant_sparsity,
    polynomial_decay,
    resolve_step,
    rounds_sparsity,
)
from lightning_eff.validation import check_bool, check_choice, check_int, check_number

__all__ = ["SCHEDULES", "PruningConfig"]

SCHEDULES = ("constant", "polynomial", "rounds", "steps")
_DEFAULT_END_FRACTION = 0.75


def _str_list(option: str, value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    for v in value:
        if not isinstance(v, str):
            raise ConfigError(f"{option} entries must be strings; got {v!r}.")
    return tuple(value)


@dataclass(frozen=True)
class PruningConfig:
    """All options of :class:`~lightning_eff.callbacks.pruning.Pruning` (see there for their meaning).

    Raises:
        ConfigError: any option outside its type, range or choices, naming it.
    """

    amount: float = 0.5
    schedule: str = "polynomial"
    initial_amount: float = 0.0
    begin_step: int | None = None
    begin_fraction: float | None = None
    end_step: int | None = None
    end_fraction: float | None = None
    frequency: int = 100
    power: float = 3.0
    rounds: int = 3
    schedule_steps: tuple[int, ...] | None = None
    schedule_amounts: tuple[float, ...] | None = None
    saliency: str = "l1"
    granularity: str = "unstructured"
    distribution: str = "global"
    n: int = 2
    m: int = 4
    block: tuple[int, int] = (1, 4)
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    module_types: tuple[str, ...] | None = DEFAULT_MODULE_TYPES
    parameter_names: tuple[str, ...] = ("weight",)
    min_params: int = 0
    skip_first: bool = False
    regrowth: str | None = None
    regrowth_fraction: float = 0.3
    regrowth_interval: int = 100
    regrowth_end_step: int | None = None
    regrowth_end_fraction: float | None = None
    rewind_step: int | None = None
    seed: int = 0
    allow_full: bool = False
    _schedule_pairs: tuple[tuple[int, float], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        check_sparsity("amount", self.amount, self.allow_full)
        check_bool("allow_full", self.allow_full)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_sparsity("initial_amount", self.initial_amount, self.allow_full)
        if self.schedule == "polynomial" and self.initial_amount > self.amount:
            raise ConfigError(
                f"decreasing schedule: initial_amount={self.initial_amount} > amount={self.amount}; "
                "the sparsity would go down at the end step. Pruned weights cannot come back."
            )
        check_step_or_fraction("begin", self.begin_step, self.begin_fraction)
        check_step_or_fraction("end", self.end_step, self.end_fraction)
        if self.begin_step is not None and self.end_step is not None and self.end_step <= self.begin_step:
            raise ConfigError(f"end_step={self.end_step} must come after begin_step={self.begin_step}.")
        if self.begin_fraction is not None and self.end_fraction is not None and self.end_fraction <= self.begin_fraction:
            raise ConfigError(f"end_fraction={self.end_fraction} must come after begin_fraction={self.begin_fraction}.")
        check_int("frequency", self.frequency, low=1)
        check_number("power", self.power, low=0.0, low_inclusive=False)
        check_int("rounds", self.rounds, low=1)
        if self.schedule == "steps":
            if self.schedule_steps is None or self.schedule_amounts is None:
                raise ConfigError("schedule='steps' needs schedule_steps=[...] and schedule_amounts=[...] of equal length.")
            pairs = check_sparsity_schedule(list(self.schedule_steps), list(self.schedule_amounts), self.allow_full)
            set_(self, "_schedule_pairs", tuple(pairs))
        elif self.schedule_steps is not None or self.schedule_amounts is not None:
            raise ConfigError(f"schedule_steps/schedule_amounts apply to schedule='steps' only (schedule={self.schedule!r}).")
        check_choice("saliency", self.saliency, SALIENCIES)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("distribution", self.distribution, DISTRIBUTIONS)
        check_nm(self.n, self.m)
        set_(self, "block", check_block(self.block))
        if self.granularity == "nm":
            if abs(self.amount - (1 - self.n / self.m)) > 1e-9:
                raise ConfigError(
                    f"granularity='nm' with n={self.n}, m={self.m} fixes the sparsity at 1 - n/m = {1 - self.n / self.m:g}; "
                    f"amount={self.amount} contradicts it. Set amount={1 - self.n / self.m:g}."
                )
            if self.schedule != "constant":
                raise ConfigError(f"granularity='nm' applies one fixed pattern: use schedule='constant' (got {self.schedule!r}).")
        for option in ("include", "exclude"):
            patterns = check_patterns(option, getattr(self, option))
            set_(self, option, None if patterns is None else tuple(patterns))
        set_(self, "module_types", _str_list("module_types", self.module_types))
        names = _str_list("parameter_names", self.parameter_names)
        if not names:
            raise ConfigError("parameter_names must name at least one parameter, e.g. ['weight'].")
        set_(self, "parameter_names", names)
        check_int("min_params", self.min_params, low=0)
        check_bool("skip_first", self.skip_first)
        if self.regrowth is not None:
            check_choice("regrowth", self.regrowth, REGROWTH)
            if self.granularity != "unstructured":
                raise ConfigError(f"regrowth={self.regrowth!r} moves single weights: it needs granularity='unstructured' (got {self.granularity!r}).")
            if self.schedule != "constant":
                raise ConfigError(f"regrowth={self.regrowth!r} trains at a fixed sparsity: use schedule='constant' (got {self.schedule!r}).")
            if self.regrowth == "rigl" and self.saliency != "l1":
                raise ConfigError("regrowth='rigl' drops by magnitude and grows by gradient; leave saliency='l1'.")
        check_number("regrowth_fraction", self.regrowth_fraction, low=0.0, high=1.0)
        check_int("regrowth_interval", self.regrowth_interval, low=1)
        check_step_or_fraction("regrowth_end", self.regrowth_end_step, self.regrowth_end_fraction)
        check_int("rewind_step", self.rewind_step, low=0, allow_none=True)
        check_int("seed", self.seed)

    # ------------------------------------------------------------------ schedule
    def steps(self, total_steps: float | None) -> tuple[int, int]:
        """``(begin, end)`` global steps of the schedule for a run of ``total_steps`` optimizer steps.

        ``end`` defaults to 75% of training (the rest fine-tunes at the final sparsity); it is at
        least ``begin + 1``.
        """
        begin = resolve_step(self.begin_step, self.begin_fraction, total_steps) or 0
        end_fraction = self.end_fraction
        if self.end_step is None and end_fraction is None:
            end_fraction = _DEFAULT_END_FRACTION if self.schedule in ("polynomial", "rounds") else None
        end = resolve_step(self.end_step, end_fraction, total_steps)
        if end is None:
            end = begin + 1
        return begin, max(end, begin + 1)

    def regrowth_end(self, total_steps: float | None, end: int) -> int:
        """Step after which regrowth stops (RigL: 75% of training by default)."""
        if self.regrowth_end_step is None and self.regrowth_end_fraction is None:
            return resolve_step(None, _DEFAULT_END_FRACTION, total_steps) if total_steps else end
        return resolve_step(self.regrowth_end_step, self.regrowth_end_fraction, total_steps)

    def target(self, step: int, begin: int, end: int) -> float:
        """Target sparsity at global ``step`` — a pure function, so a resumed run computes the same."""
        if self.schedule == "constant":
            return constant_sparsity(step, self.amount, begin)
        if self.schedule == "polynomial":
            return polynomial_decay(step, self.initial_amount, self.amount, begin, end, self.power, self.frequency, self.allow_full)
        if self.schedule == "rounds":
            return rounds_sparsity(step, self.amount, self.rounds, begin, end, self.allow_full)
        value = 0.0
        for at, amount in self._schedule_pairs:
            if step >= at:
                value = amount
        return value
