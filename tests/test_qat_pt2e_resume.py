"""pt2e QAT resumed from a mid-training checkpoint ends bit-identical to one uninterrupted run."""
from __future__ import annotations

import pytest
import torch
from test_qat_executorch import Templates, conv_net, needs_pt2e
from test_quant_callbacks import _trainer

from lightning_eff import ClassificationTask, QuantizationAwareTraining


def _task() -> ClassificationTask:
    return ClassificationTask(conv_net(), num_classes=10, optimizer="sgd", lr=0.01, scheduler="constant")


@needs_pt2e
@pytest.mark.export
@pytest.mark.slow
def test_pt2e_qat_resume_equals_uninterrupted(tmp_path):
    """Weights, BN statistics, observer ranges, scales and zero points all match exactly. Before the
    callback tracked the pt2e ops' mode itself, the uninterrupted run trained epoch 2 with eval-mode
    batch norm (after validation) and 30 of 72 state entries differed."""
    dm = Templates()
    # 8 steps per epoch, 16 in all: observers freeze at step 12, after the resume point.
    kw = dict(flow="pt2e", freeze_observer_step=12, convert_on_fit_end=False)
    uninterrupted = _task()
    _trainer(tmp_path / "a", [QuantizationAwareTraining(**kw)], max_epochs=2, limit_train_batches=None).fit(uninterrupted, datamodule=dm)

    first = _task()
    trainer = _trainer(tmp_path / "b", [QuantizationAwareTraining(**kw)], max_epochs=1, limit_train_batches=None)
    trainer.fit(first, datamodule=dm)
    ckpt = tmp_path / "b" / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["global_step"] == 8

    resumed = _task()  # a fresh float model: the callback prepares it again before the checkpoint is restored
    _trainer(tmp_path / "c", [QuantizationAwareTraining(**kw)], max_epochs=2, limit_train_batches=None).fit(
        resumed, datamodule=dm, ckpt_path=ckpt)
    expected, got = uninterrupted.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    assert any(k.endswith("scale") for k in expected) and any(k.endswith("running_var") for k in expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
