"""The docstring examples of the package run, so the API they show cannot drift (issue 14, defect 6).

Each module's examples run with its own namespace plus a few names the callback examples use:
``L``, ``torch``, ``nn``, a tiny ``task`` (MobileNetV2-tiny classification) and ``dm`` (fixed
Fashion-MNIST-shaped tensors), in a temporary working directory. An example that needs something
this cannot give (a trained checkpoint, a teacher on disk) is marked ``# doctest: +SKIP`` in place.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil
import types

import lightning as L
import pytest
import torch
from test_quant_callbacks import TinyData, _task
from torch import nn

import lightning_eff


def _modules_with_examples() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(lightning_eff.__path__, prefix="lightning_eff."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        tests = doctest.DocTestFinder(exclude_empty=True).find(module)
        if any(t.examples for t in tests):
            names.append(info.name)
    return names


MODULES = _modules_with_examples()


def test_the_public_callbacks_have_runnable_examples():
    assert {"lightning_eff.callbacks.quantization", "lightning_eff.callbacks.export", "lightning_eff.callbacks.pruning"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    lightning = types.SimpleNamespace(**{k: getattr(L, k) for k in dir(L) if not k.startswith("__")})
    lightning.Trainer = _QuietTrainer
    extra = {"L": lightning, "torch": torch, "nn": nn, "task": _task(), "dm": TinyData(), "Trainer": _QuietTrainer}
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, globs={**vars(module), **extra}):  # the quiet L.Trainer wins over the module's L
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (output above)"


class _QuietTrainer(L.Trainer):
    """``Trainer`` as the examples write it, without progress bars and loggers (CPU, a few steps)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("logger", False)
        kwargs.setdefault("enable_progress_bar", False)
        kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("enable_checkpointing", False)
        kwargs.setdefault("accelerator", "cpu")
        kwargs.setdefault("limit_train_batches", 2)
        kwargs.setdefault("limit_val_batches", 1)
        kwargs.setdefault("num_sanity_val_steps", 0)
        kwargs.setdefault("max_epochs", 1)
        super().__init__(*args, **kwargs)
