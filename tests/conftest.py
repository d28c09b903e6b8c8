"""Shared test fixtures: tiny configs on small slices of the real data."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

# Where PYTHONDONTWRITEBYTECODE is set (this project's machines set it), every process of the suite would
# recompile lightning_eff and pytest would re-rewrite every test module on each run. The suite caches them
# (in the git-ignored __pycache__ folders); the subprocesses it starts read those caches.
sys.dont_write_bytecode = False

torch.set_num_threads(1)  # tiny models: one thread is as fast and does not fight other processes
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
WORDNET_DIR = "/usr/share/wordnet"

needs_fmnist = pytest.mark.skipif(
    not os.path.exists(f"{FMNIST_DIR}/train-images-idx3-ubyte.gz"),
    reason="Fashion-MNIST not installed: apt-get install -y dataset-fashion-mnist",
)
needs_wordnet = pytest.mark.skipif(
    not os.path.exists(f"{WORDNET_DIR}/data.noun"), reason="WordNet not installed: apt-get install -y wordnet-base"
)

# A config fragment that makes any recipe a few-second run on real data.
TINY_OVERRIDES = [
    "++trainer.max_epochs=1",
    "++trainer.limit_train_batches=3",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "++data.limit_train=384",
    "++data.limit_val=128",
    "++data.limit_test=128",
    "++data.batch_size=64",
    "++report.repeats=1",
    "++report.batch_sizes=[1,4]",
    "++report.memory=false",
    "++print_report=false",
]


@pytest.fixture(autouse=True)
def _quiet_warnings():
    if os.environ.get("LIGHTNING_EFF_STRICT_WARNINGS"):  # make test-strict: every warning is an error
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        yield


@pytest.fixture(autouse=True)
def _restore_global_torch_flags():
    """``Trainer(deterministic=True)`` sets torch's global determinism flag and never resets it;
    int8 CPU kernels (quantized_resize_) then refuse to run in every later test."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)
