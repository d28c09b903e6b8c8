"""Export: TorchScript / lite round trips with engine metadata, atomic writes, verification, ExecuTorch, ONNX."""
from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
from torch import nn

from lightning_eff.compression.quantization.engines import quantized_engine
from lightning_eff.compression.quantization.fx import (
    calibrate,
    convert_fx_model,
    prepare_ptq_fx_model,
)
from lightning_eff.errors import ConfigError, ExportUnavailableError
from lightning_eff.export import (
    ExportError,
    export_executorch,
    export_lite,
    export_onnx,
    export_torchscript,
    load_artifact,
    mobile_optimizer_available,
    perturbed_inputs,
    read_metadata,
    verify_artifact,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()


@pytest.fixture(scope="module")
def example():
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def _int8(engine: str, x: torch.Tensor) -> nn.Module:
    prepared = prepare_ptq_fx_model(_net(), x, engine=engine, observer="minmax")
    calibrate(prepared, [x, torch.randn(8, 3, 12, 12)])
    return convert_fx_model(prepared)


def _no_temp_files(folder) -> bool:
    return not [f for f in os.listdir(folder) if f.startswith(".") or f.endswith(".tmp")]


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_torchscript_quantized_save_load_exact_and_metadata(tmp_path, example, engine):
    model = _int8(engine, example)
    path = export_torchscript(model, example, tmp_path / "m.pt")
    with quantized_engine(engine):
        meta = read_metadata(path)
    assert meta["engine"] == engine and meta["format"] == "torchscript" and meta["quantized"]
    assert meta["input_shapes"] == [[2, 3, 12, 12]] and meta["torch_version"] == torch.__version__
    art = load_artifact(path)
    x = torch.randn(5, 3, 12, 12)  # different batch size than the example
    with quantized_engine(engine), torch.no_grad():
        assert torch.equal(art(x), model(x))
    assert _no_temp_files(tmp_path)


def test_lite_round_trip_and_engine_mismatch_warning(tmp_path, example):
    model = _int8("qnnpack", example)
    path = export_lite(model, example, tmp_path / "m.ptl")
    with quantized_engine("x86"):
        with pytest.warns(UserWarning, match="exported for quantized engine 'qnnpack'.*current engine is 'x86'"):
            meta = read_metadata(path)
        art = load_artifact(path)  # loads and runs under the recorded engine
    assert meta["format"] == "lite" and art.engine == "qnnpack"
    x = perturbed_inputs(example, 1)[0][0]
    with quantized_engine("qnnpack"), torch.no_grad():
        assert torch.equal(art(x), model(x))


def test_optimize_for_mobile_unavailable(tmp_path, example):
    if mobile_optimizer_available():
        pytest.skip("this torch build has XNNPACK")
    with pytest.raises(ExportUnavailableError, match="XNNPACK.*ExecuTorch"):
        export_lite(_net(), example, tmp_path / "o.ptl", optimize=True)
    assert not (tmp_path / "o.ptl").exists()


class _DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else -x


def test_trace_warning_is_error_and_write_is_atomic(tmp_path, example):
    target = tmp_path / "keep.pt"
    target.write_bytes(b"previous good artifact")
    with pytest.raises(ExportError, match="not faithful"):
        export_torchscript(_DataDependent(), example, target)
    assert target.read_bytes() == b"previous good artifact"
    assert _no_temp_files(tmp_path)
    with pytest.raises(ConfigError, match="method"):
        export_torchscript(_net(), example, tmp_path / "x.pt", method="compile")


def test_exporting_fake_quant_model_warns(tmp_path, example):
    from lightning_eff.compression.quantization.fx import prepare_qat_fx_model

    prepared = prepare_qat_fx_model(_net(), example)
    with pytest.warns(UserWarning, match="fake-quant"):
        export_torchscript(prepared, example, tmp_path / "p.pt")


def test_verify_on_inputs_different_from_example(tmp_path, example):
    model = _net()
    path = export_torchscript(model, example, tmp_path / "f.pt")
    art = load_artifact(path)
    batches = perturbed_inputs(example, 2) + [torch.randn(7, 3, 12, 12)]
    assert all(not torch.equal(b[0], example) for b in batches[:2])
    report = verify_artifact(model, art, batches, example_inputs=example)
    assert report["top1_agreement"] == 1.0 and report["max_abs_err"] < 1e-5 and report["samples"] == 11
    with pytest.raises(ConfigError, match="must differ from the export example"):
        verify_artifact(model, art, [example], example_inputs=example)


class _BakedShape(nn.Module):
    """Traces without warnings but bakes the example's batch size into a constant."""

    def forward(self, x):
        return x.flatten(1) + torch.ones(2, 1)


def test_verification_catches_baked_in_shapes(tmp_path, example):
    model = _BakedShape()
    art = load_artifact(export_torchscript(model, example, tmp_path / "b.pt"))
    with pytest.raises(RuntimeError):
        verify_artifact(model, art, [torch.randn(3, 3, 12, 12)])


@pytest.mark.export
def test_executorch_pt2e_int8_round_trip(tmp_path, example):
    pytest.importorskip("executorch")
    from lightning_eff.compression.quantization.fx import sqnr_db
    from lightning_eff.compression.quantization.pt2e import (
        convert_pt2e_model,
        is_pt2e_quantized,
        prepare_pt2e_model,
    )

    model = _net()
    prepared = prepare_pt2e_model(model, (example,), qat=False)
    with torch.no_grad():
        for batch in [example] + [b[0] for b in perturbed_inputs(example, 3, seed=3)]:
            prepared(batch)
    int8 = convert_pt2e_model(prepared)
    assert is_pt2e_quantized(int8) and not is_pt2e_quantized(prepared)
    path = export_executorch(int8, (example,), tmp_path / "m.pte")
    assert read_metadata(path)["quantized"] and _no_temp_files(tmp_path)
    art = load_artifact(path)
    batches = perturbed_inputs(example, 2, seed=7)  # .pte shapes are static: same shape, new values
    report = verify_artifact(int8, art, batches, example_inputs=example)
    assert report["top1_agreement"] >= 0.75 and report["max_abs_err"] < 0.1
    with torch.no_grad():
        assert sqnr_db(model(batches[0][0]), art(batches[0][0])) > 20


@pytest.mark.export
@pytest.mark.slow
def test_pt2e_qat_prepare_train_convert(example):
    pytest.importorskip("torchao")
    from lightning_eff.compression.quantization.pt2e import (
        convert_pt2e_model,
        prepare_pt2e_model,
        set_pt2e_training,
    )

    prepared = prepare_pt2e_model(_net().train(), (example,), qat=True)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    loss = prepared(example).square().mean()
    loss.backward()
    opt.step()
    int8 = convert_pt2e_model(prepared)
    prepared.train()  # still trainable after convert (convert works on a copy)
    prepared(example).square().mean().backward()
    set_pt2e_training(prepared, False)
    assert int8(example).shape == (2, 5)


@pytest.mark.export
def test_onnx_export_metadata(tmp_path, example):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    path = export_onnx(_net(), (example,), tmp_path / "m.onnx")
    assert read_metadata(path)["format"] == "onnx"
    if importlib.util.find_spec("onnxruntime") is None:
        with pytest.raises(ExportUnavailableError, match="onnxruntime"):
            load_artifact(path)
    else:
        assert verify_artifact(_net(), load_artifact(path), perturbed_inputs(example, 1))["max_abs_err"] < 1e-4


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="suffix"):
        load_artifact(tmp_path / "m.bin")
    with pytest.raises(FileNotFoundError):
        load_artifact(tmp_path / "absent.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FileNotFoundError):
            read_metadata(tmp_path / "absent.pt")


def test_pt2e_pattern_cache_gives_the_same_graphs_and_int8_model(example, monkeypatch):
    """torchao re-traces its conv-bn / q-dq patterns on every prepare/convert (0.5 s each); the cache keeps
    each trace, hands out fresh copies, and the int8 model is bit-identical to the uncached one."""
    pytest.importorskip("torchao")
    import importlib

    from lightning_eff.compression.quantization import pt2e

    pt2e._imports()
    utils = importlib.import_module("torchao.quantization.pt2e.utils")
    cached = utils._get_aten_graph_module_for_pattern
    assert hasattr(cached, "__wrapped__")
    from torchao.quantization.pt2e.export_utils import WrapperModule

    def pattern(x, w):
        return torch.nn.functional.conv2d(x, w).relu()

    args = (torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3))
    first, second = cached(WrapperModule(pattern), args), cached(WrapperModule(pattern), args)
    plain = cached.__wrapped__(WrapperModule(pattern), args)
    assert first.code == second.code == plain.code and first.graph is not second.graph
    output = next(n for n in first.graph.nodes if n.op == "output")
    with first.graph.inserting_before(output):  # a caller edits the graph it received
        first.graph.call_function(torch.ops.aten.neg.default, (next(iter(first.graph.nodes)),))
    first.recompile()
    assert first.code != plain.code
    assert cached(WrapperModule(pattern), args).code == plain.code  # an edited copy never reaches the next caller
    holder = torch.nn.Linear(2, 2)
    assert pt2e._pattern_key(holder, args, False, {}) is None  # a module with weights is never cached
    bias = torch.ones(2)
    assert pt2e._pattern_key(WrapperModule(lambda x, w: torch.nn.functional.conv2d(x, w) + bias), args, False, {}) is None

    def int8_out():
        prepared = pt2e.prepare_pt2e_model(_net(), (example,), qat=False)
        prepared(example)
        return pt2e.convert_pt2e_model(prepared)(example)

    with_cache = int8_out()
    for name in pt2e._PATTERN_MODULES:
        module = importlib.import_module(name)
        if hasattr(getattr(module, "_get_aten_graph_module_for_pattern", None), "__wrapped__"):
            monkeypatch.setattr(module, "_get_aten_graph_module_for_pattern", module._get_aten_graph_module_for_pattern.__wrapped__)
    assert torch.equal(with_cache, int8_out())
