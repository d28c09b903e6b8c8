"""The pt2e flow of ``QuantizationAwareTraining`` in a real Lightning fit: fake-quant training across
validation, int8 conversion that matches the fake-quant model, and an int8 ExecuTorch ``.pte``.

Slow by nature: torchao's QAT prepare and convert ``torch.export`` ~100 conv-BN pattern graphs each,
a fixed cost of 20-40 s on two shared cores whatever the model size.
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from test_qat_executorch import Templates, _top1, conv_net, float_trained, needs_pt2e
from test_quant_callbacks import _trainer

from lightning_eff import Export, QuantizationAwareTraining
from lightning_eff import export as ex
from lightning_eff.compression.quantization.fx import sqnr_db


class BatchNormProbe(L.Callback):
    """Records whether BN running statistics move during each training step (they must in train mode)."""

    def __init__(self) -> None:
        self.moved: list[tuple[int, bool]] = []

    def _stats(self, pl_module):
        return torch.cat([b.detach().flatten().clone() for n, b in pl_module.model.named_buffers() if n.endswith("running_mean")])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = self._stats(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.moved.append((trainer.current_epoch, not torch.equal(self._before, self._stats(pl_module))))


@needs_pt2e
@pytest.mark.export
@pytest.mark.slow
def test_pt2e_qat_callback_fit_convert_and_pte(tmp_path):
    from lightning_eff.compression.quantization.pt2e import (
        is_pt2e_quantized,
        set_pt2e_training,
    )

    dm = Templates()
    task = float_trained(tmp_path, dm)
    # Observers freeze half-way: the converted copy and the fake-quant model then share scales exactly.
    qat = QuantizationAwareTraining(flow="pt2e", freeze_observer_fraction=0.5)
    probe = BatchNormProbe()
    export = Export(formats=["pte"], output_dir=str(tmp_path / "art"), verify_examples=8, latency=False)
    # Two epochs with validation in between: training must resume in train mode (Lightning restores
    # modes by assigning .training, which does not switch the pt2e graph's batch-norm ops).
    trainer = _trainer(tmp_path, [qat, probe, export], max_epochs=2, limit_train_batches=4, enable_checkpointing=True)
    trainer.fit(task, datamodule=dm)
    assert [epoch for epoch, moved in probe.moved if moved] == [0] * 4 + [1] * 4

    assert isinstance(task.model, torch.fx.GraphModule) and task.model is qat.prepared_model
    int8 = qat.deployable_models()["qat_int8_xnnpack"]
    assert is_pt2e_quantized(int8) and not is_pt2e_quantized(qat.prepared_model)
    x, y = dm.held_out()
    set_pt2e_training(qat.prepared_model, False)
    with torch.no_grad():
        fake_quant, real = qat.prepared_model(x), int8(x)
    # The int8 graph computes what QAT simulated: measured 43 dB and 100% agreement on this task.
    assert sqnr_db(fake_quant, real) > 30
    assert _top1(fake_quant, real) >= 0.97
    assert float((real.argmax(-1) == y).float().mean()) >= 0.8  # the task was learned, not just agreed on

    (art,) = export.artifacts()
    assert art["variant"] == "qat_int8_xnnpack" and art["format"] == "pte" and "error" not in art, art
    assert art["top1_agreement"] >= 0.99 and art["samples"] == 8  # loaded back, run on examples other than the trace one
    assert ex.read_metadata(art["path"])["quantized"] is True
    fp32_weight_bytes = sum(p.numel() * 4 for p in conv_net().parameters())
    assert art["bytes"] < 0.6 * fp32_weight_bytes  # int8 weights: 18.5 kB measured vs 44 kB of fp32 weights
    loaded = ex.load_artifact(art["path"])
    assert _top1(loaded(x[:1]), real[:1]) == 1.0

    # The trained module stays a (pt2e) fake-quant model: test runs and checkpoints load safely.
    trainer.test(task, datamodule=dm, verbose=False)
    ckpt = tmp_path / "pt2e.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any("activation_post_process" in k for k in state)
