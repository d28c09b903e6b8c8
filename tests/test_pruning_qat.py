"""Pruning x QAT in either callback order: the converted int8 model keeps the target sparsity."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_eff.callbacks import QuantizationAwareTraining
from lightning_eff.callbacks.pruning import Pruning
from lightning_eff.tasks import ClassificationTask

torch.set_num_threads(1)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _int8_weights(model):
    """``{module path: dequantized int8 weight}`` of a converted FX model."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if callable(w):
            try:
                w = w()
            except Exception:
                continue
        if isinstance(w, torch.Tensor) and w.is_quantized:
            out[name] = w.dequantize()
    return out


@pytest.mark.parametrize("order", ["prune_first", "qat_first"])
def test_int8_model_keeps_sparsity(tmp_path, order):
    L.seed_everything(0)
    pruning = Pruning(amount=0.6, schedule="polynomial", frequency=1, end_step=2, export_sparse="int8",
                      output_dir=str(tmp_path / "art"))
    qat = QuantizationAwareTraining(engines=["x86"], example_input_shape=[1, 16, 16])
    callbacks = [pruning, qat] if order == "prune_first" else [qat, pruning]
    task = ClassificationTask({"name": "mobilenetv2_tiny", "num_classes": 10, "in_chans": 1}, scheduler="constant", lr=0.05)
    trainer = L.Trainer(max_epochs=1, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(task, _loader())
    assert pruning.pruner.sparsity == pytest.approx(0.6)
    # the masks act on the prepared (fake-quant) model's tensors
    prepared = dict(qat.prepared_model.named_parameters())
    assert all(bool((prepared[k][~m] == 0).all()) for k, m in pruning.masks.items())
    int8 = qat.deployable_models()["qat_int8_x86"]
    weights = _int8_weights(int8)
    checked = 0
    for name, mask in pruning.masks.items():
        module = name.rsplit(".", 1)[0]
        assert module in weights, f"{module} not quantized"
        assert bool((weights[module][~mask.cpu()] == 0).all()), f"{module}: pruned zeros lost in int8"
        checked += 1
    assert checked == len(pruning.masks) > 10
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert zeros / total >= 0.6 - 1e-3
    (entry,) = pruning.artifacts()
    assert entry["variant"] == "pruned_sparse_int8" and entry["bytes_ratio"] < 0.3
