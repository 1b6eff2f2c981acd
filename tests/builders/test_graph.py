"""The ONNX export and its polygraphy check, and the TensorRT path up to where TensorRT is needed."""

from __future__ import annotations

import json
import shutil

import pytest

from builders.build import main as build
from tests.conftest import tiny_onnx_build

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install -e .[onnx])")
pytest.importorskip("polygraphy", reason="the onnx extra is not installed (pip install -e .[onnx])")


def test_onnx_build_records_the_polygraphy_check(tiny_onnx_entry):
    engine = tiny_onnx_entry / "1" / "engine"
    meta = json.loads((engine / "engine.json").read_text())
    graph = meta["graph"]
    assert graph["backend"] == "onnx" and (engine / graph["onnx"]).is_file()
    check = graph["check"]
    assert check["passed"] and check["feeds"] >= 6 and check["tool"].startswith("polygraphy")
    assert check["max_abs_diff"]["logits"] <= check["tolerances"]["logits"]["atol"]
    assert check["greedy_agreement"] == 1.0
    # the export's inputs and outputs, with the dynamic axes the runners rely on
    import onnx

    model = onnx.load(str(engine / graph["onnx"]), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["past_key.0"][0] == "batch" and inputs["past_key.0"][2] == "past"
    assert [o.name for o in model.graph.output][:3] == ["logits", "present_key.0", "present_value.0"]


def test_polygraphy_check_fails_on_a_graph_that_differs(tiny_onnx_entry, tmp_path):
    """A graph whose weights drifted from the model's must not pass the check."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from builders.onnx_check import check_graph
    from builders.onnx_export import Decoder

    engine = tiny_onnx_entry / "1" / "engine"
    model = onnx.load(str(engine / "model.onnx"))
    for init in model.graph.initializer:
        if init.name == "norm":  # the final RMSNorm's weight: every logit moves with it
            array = numpy_helper.to_array(init) * 1.5
            init.CopyFrom(numpy_helper.from_array(array.astype(np.float32), init.name))
            break
    else:
        pytest.fail("the final norm's weight is not among the graph's initializers")
    onnx.save(model, str(tmp_path / "drifted.onnx"))
    decoder = Decoder.from_engine_folder(engine)
    result = check_graph(tmp_path / "drifted.onnx", decoder, [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    assert not result.passed and result.max_abs_diff["logits"] > result.tolerances["logits"]["atol"]


def test_quantized_onnx_build_runs_its_codes_and_checks_them_exactly(tiny_onnx_int4_entry):
    """The graph multiplies the folder's int4 codes (MatMulNBits), no dense copy of the projections;
    the check compares float32 products within the dense tolerances, and records the served graph."""
    import onnx

    engine = tiny_onnx_int4_entry / "1" / "engine"
    graph = json.loads((engine / "engine.json").read_text())["graph"]
    assert graph["weights"] == {"operator": "MatMulNBits", "accuracy_level": 4}
    check, served = graph["check"], graph["check_served"]
    assert check["passed"] and check["max_abs_diff"]["logits"] <= check["tolerances"]["logits"]["atol"]
    assert served["passed"] is None and served["tolerances"] == {} and served["feeds"] == check["feeds"]
    assert not (engine / "model.exact.onnx").exists()
    model = onnx.load(str(engine / graph["onnx"]), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    layers = json.loads((engine / "config.json").read_text())["num_hidden_layers"]
    assert ops.count("MatMulNBits") == 4 * layers + 1  # QKV, O, gate-up, down; the LM head
    assert ops.count("RotaryEmbedding") == 2 * layers
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {4}


def test_without_int8_activations_the_served_graph_is_the_checked_one(tmp_path_factory, smollm2_source):
    """--no-int8-activations: the graph's MatMulNBits multiply in float32, so the check runs on the
    served graph itself and answers exactly as the PyTorch runner does."""
    import onnx

    args = ("--quantize", "int4", "--group-size", "32", "--no-int8-activations")
    engine = tiny_onnx_build(tmp_path_factory, smollm2_source[1], *args) / "1" / "engine"
    graph = json.loads((engine / "engine.json").read_text())["graph"]
    assert graph["weights"] == {"operator": "MatMulNBits", "accuracy_level": 0}
    assert graph["check"]["passed"] and "check_served" not in graph
    model = onnx.load(str(engine / graph["onnx"]), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {0}


def test_onnx_backend_refuses_what_it_cannot_serve(tmp_path, capsys):
    for extra, message in (
        (["--device", "gpu"], "ONNX Runtime on the CPU"),
        (["--dtype", "bfloat16"], "exports a float32 graph"),
        (["--runner", "tensorrt"], "--runner tensorrt needs an entry built with --backend tensorrt"),
    ):
        code = build(["--model", "smollm2", "--name", "x", "--repository", str(tmp_path), "--backend", "onnx", *extra])
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_graph_backends_refuse_weights_they_cannot_take():
    from builders.graph import GraphBuildError, check_backend

    with pytest.raises(GraphBuildError, match="fp8 runs on GPUs"):
        check_backend("onnx", False, "fp8", "auto", "float32")
    with pytest.raises(GraphBuildError, match="--backend tensorrt builds from dense weights"):
        check_backend("tensorrt", True, "int4", "auto", "float32")
    with pytest.raises(GraphBuildError, match="needs --backend onnx and --quantize"):
        check_backend("onnx", False, "none", "auto", "float32", int8_activations=False)  # dense: nothing to round
    check_backend("onnx", False, "int4", "onnxruntime", "float32")  # accepted
    check_backend("onnx", False, "gguf", "auto", "float32", int8_activations=False)


def test_tensorrt_backend_stops_at_once_naming_where_tensorrt_is(tmp_path, capsys):
    from python_backend.engine.graph_runner import tensorrt_missing

    if tensorrt_missing(builder=True) is None:
        pytest.skip("TensorRT's builder is installed here; the refusal does not apply")
    code = build(
        ["--model", "smollm2", "--name", "x", "--repository", str(tmp_path), "--backend", "tensorrt", "--device", "gpu"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "TensorRT" in err and "nvcr.io/nvidia/tritonserver" in err
    assert "hashing" not in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("max_len", [512, 100])
def test_tensorrt_profiles_cover_prefills_and_decode_batches(tiny_onnx_entry, max_len):
    from builders.graph import tensorrt_profiles
    from builders.onnx_export import Decoder
    from python_backend.engine.graph_runner import DECODE_PROFILE, PREFILL_PROFILE, GraphNames

    decoder = Decoder.from_engine_folder(tiny_onnx_entry / "1" / "engine")
    profiles = tensorrt_profiles(decoder, max_seqs=16, max_step=min(64, max_len), max_len=max_len)
    names = set(GraphNames(decoder.cfg.num_layers).inputs)
    for shapes in profiles:
        assert set(shapes) == names
        for name, (low, opt, high) in shapes.items():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high)), name
    prefill, decode = profiles[PREFILL_PROFILE], profiles[DECODE_PROFILE]
    assert prefill["input_ids"][2] == (1, min(64, max_len)) and decode["input_ids"][2] == (16, 1)
    assert decode["past_key.0"][0][2] == 0 and decode["past_key.0"][2][2] == max_len - 1


def test_tensorrt_runner_refuses_where_tensorrt_is_missing(tiny_onnx_entry, tmp_path):
    from python_backend.engine.engine import Engine
    from python_backend.engine.engine_folder import EngineFolderError
    from python_backend.engine.graph_runner import tensorrt_missing

    engine = tiny_onnx_entry / "1" / "engine"
    with pytest.raises(EngineFolderError, match="--backend tensorrt"):
        Engine.from_folder(engine, runner="tensorrt")
    if tensorrt_missing() is None:
        pytest.skip("TensorRT is installed here")
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    meta = json.loads((copy / "engine.json").read_text())
    meta["graph"]["tensorrt"] = "model.plan"
    (copy / "engine.json").write_text(json.dumps(meta))
    (copy / "model.plan").write_bytes(b"not an engine")
    with pytest.raises(RuntimeError, match="nvcr.io/nvidia/tritonserver"):
        Engine.from_folder(copy)
