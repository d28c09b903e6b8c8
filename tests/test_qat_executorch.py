"""FX QAT-trained weights reach an int8 ExecuTorch ``.pte`` through the ``Export`` callback.

Also home of the small learnable task (``Templates``) and conv net the pt2e QAT and weight-only tests share."""
from __future__ import annotations

from importlib.util import find_spec

import lightning as L
import pytest
import torch
from test_quant_callbacks import _trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eff import ClassificationTask, Export, QuantizationAwareTraining
from lightning_eff import export as ex
from lightning_eff.compression.quantization.engines import (
    model_engine,
    quantized_engine,
)
from lightning_eff.compression.quantization.fx import set_fake_quant

# A marker, not importorskip: other test files import Templates from here and must not be skipped.
needs_pt2e = pytest.mark.skipif(find_spec("executorch") is None or find_spec("torchao") is None,
                                reason="needs the export extra: pip install 'lightning_eff[export]'")


class Templates(L.LightningDataModule):
    """A learnable task: each class is a fixed random 16x16 pattern plus noise; held-out split for checks."""

    def __init__(self, n: int = 192, n_train: int = 128, batch_size: int = 16, noise: float = 0.8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        templates = torch.randn(10, 1, 16, 16, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)
        self.x = templates[self.y] + noise * torch.randn(n, 1, 16, 16, generator=g)
        self.n_train, self.batch_size, self.num_classes = n_train, batch_size, 10

    def sample_inputs(self, n: int = 1) -> torch.Tensor:
        return self.x[-n:]

    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[self.n_train :], self.y[self.n_train :]

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x[: self.n_train], self.y[: self.n_train]), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(TensorDataset(*self.held_out()), batch_size=32)

    test_dataloader = val_dataloader


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )


def float_trained(tmp_path, dm: Templates) -> ClassificationTask:
    """QAT fine-tunes a trained float model (as the recipes do): observers start from sensible ranges."""
    task = ClassificationTask(conv_net(), num_classes=10, optimizer="sgd", lr=0.05, scheduler="constant")
    _trainer(tmp_path / "float", [], max_epochs=3, limit_train_batches=None).fit(task, datamodule=dm)
    task.hparams.lr = 0.005
    return task


def _top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


@needs_pt2e
@pytest.mark.export
def test_fx_qat_weights_reach_executorch_via_pt2e_calibration(tmp_path):
    from lightning_eff.callbacks.export import float_from_fx_qat

    dm = Templates()
    task = float_trained(tmp_path, dm)
    qat = QuantizationAwareTraining(engines=["x86"], freeze_observer_fraction=0.5)
    export = Export(formats=["pt", "pte"], output_dir=str(tmp_path / "art"), verify_examples=8, latency=False,
                    calibration_batches=4)
    _trainer(tmp_path, [qat, export], limit_train_batches=None).fit(task, datamodule=dm)
    arts = {f"{a['variant']}.{a['format']}": a for a in export.artifacts()}
    assert set(arts) == {"qat_int8_x86.pt", "qat_weights_ptq_int8_xnnpack.pte"}, arts
    pte = arts["qat_weights_ptq_int8_xnnpack.pte"]
    assert "error" not in pte and ex.read_metadata(pte["path"])["quantized"] is True
    assert pte["top1_agreement"] >= 0.99  # against the float network its weights came from
    assert pte["bytes"] < 0.6 * sum(p.numel() * 4 for p in conv_net().parameters())

    # The stripped float network is exactly the QAT model with fake quantization's rounding switched off: each
    # activation fake-quant still clamps to its range, (qmin - zp) * scale .. (qmax - zp) * scale (hand-written here).
    prepared = qat.prepared_model.eval()
    x, y = dm.held_out()
    stripped = float_from_fx_qat(prepared)
    assert not any(hasattr(m, "weight_fake_quant") or hasattr(m, "enable_fake_quant") for m in stripped.modules())

    def clamp_hook(module, args, out):
        obs = module.activation_post_process
        s, z = float(module.scale), int(module.zero_point)
        return out.clamp((obs.quant_min - z) * s, (obs.quant_max - z) * s)

    acts = [m for n, m in prepared.named_modules() if hasattr(m, "enable_fake_quant") and "weight_fake_quant" not in n]
    handles = [m.register_forward_hook(clamp_hook) for m in acts]
    with torch.no_grad():
        set_fake_quant(prepared, False)
        reference = prepared(x)
        set_fake_quant(prepared, True)
        torch.testing.assert_close(stripped(x), reference, rtol=1e-4, atol=1e-4)
    for h in handles:
        h.remove()
    assert any(hasattr(m, "enable_fake_quant") for m in prepared.modules())  # the trained model is untouched

    # The .pte (QAT weights, pt2e-calibrated) predicts what the FX int8 model of the same QAT run predicts.
    fx_int8 = qat.deployable_models()["qat_int8_x86"]
    pte_model = ex.load_artifact(pte["path"])
    with torch.no_grad(), quantized_engine(model_engine(fx_int8)):
        fx_out = fx_int8(x)
    pte_out = torch.cat([pte_model(x[i : i + 1]) for i in range(x.shape[0])])
    assert _top1(pte_out, fx_out) >= 0.95
    assert float((pte_out.argmax(-1) == y).float().mean()) >= 0.8
