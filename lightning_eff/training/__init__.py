"""Training efficiency (the survey's §3.5 "model tuning guide"), Trainer-free cores.

Why a layer beside ``compression`` and ``learning``: these techniques change *how* a network
trains (numeric precision, what autograd keeps for backward, how gradients travel between
processes, how the graph is compiled and laid out in memory), not what it computes; they import
only the floor, ``surgery`` and ``measure``, and the Lightning layer (``callbacks/``,
``strategies``) decides when they apply.

- :mod:`~lightning_eff.training.precision`: ``auto`` precision from the hardware.
- :mod:`~lightning_eff.training.checkpointing`: activation checkpointing for any module.
- :mod:`~lightning_eff.training.ddp`: gradient-communication hooks.
- :mod:`~lightning_eff.training.layout`: ``torch.compile`` and channels-last.
- :mod:`~lightning_eff.training.allocator`: glibc's allocator thresholds (no page faults per step).
"""
