"""Measurement layer: what a model costs (counts, bytes, MACs), how fast it runs, how much memory.

Why a layer of its own: every technique is judged by these numbers (the survey's footprint
metrics), so measurement sits *below* models, techniques, export and the report, and imports
nothing above the floor (``errors``, ``validation``, ``batch``, ``atomic``). Latency has one
harness (:mod:`lightning_eff.measure.timing`) that every report, callback and benchmark uses.

Modules: ``counts`` (parameters, non-zeros, bytes, MACs), ``timing`` (latency, interleaved
rounds, spread and the ``noisy`` flag), ``memory`` (peak memory), ``activations`` (bytes saved for backward), ``machine`` (CPU capability and
ISA flags), ``footprint`` (:func:`measure_footprint` and its table).
"""
from lightning_eff.atomic import write_results
from lightning_eff.measure.activations import SavedTensorCounter, saved_activation_bytes
from lightning_eff.measure.counts import (
    count_macs,
    count_nonzero_parameters,
    count_parameters,
    file_bytes,
    gzip_size,
    serialize_state_dict,
    state_dict_bytes,
    weight_tensors,
)
from lightning_eff.measure.footprint import format_table, measure_footprint
from lightning_eff.measure.machine import cpu_capability, cpu_flags
from lightning_eff.measure.memory import peak_memory_mb, process_peak_rss_mb
from lightning_eff.measure.timing import (
    DEFAULT_MAX_SPREAD,
    TimingResult,
    VariantTiming,
    interleaved_min_ms,
    interleaved_times,
    measure_latencies,
    measure_latency,
    time_interleaved,
    time_models,
    train_step_fn,
)

__all__ = [
    "count_macs", "count_nonzero_parameters", "count_parameters", "file_bytes", "gzip_size", "serialize_state_dict",
    "state_dict_bytes", "weight_tensors", "format_table", "measure_footprint", "cpu_capability", "cpu_flags",
    "peak_memory_mb", "process_peak_rss_mb", "interleaved_min_ms", "interleaved_times", "measure_latencies",
    "measure_latency", "write_results", "DEFAULT_MAX_SPREAD", "TimingResult", "VariantTiming", "time_interleaved",
    "time_models", "train_step_fn", "SavedTensorCounter", "saved_activation_bytes",
]
