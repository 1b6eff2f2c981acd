"""The builder's quantization: rounding, AWQ's folding, the GGUF file's own blocks, the text it
calibrates and evaluates on, `fastserve evaluate`, and each quantized build served by the real
tritonserver."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from builders import quantize
from builders.quantize import QuantizeOptions, group_size_for
from builders.text import corpus
from python_backend.models.quantized import QuantizedWeight
from tests.conftest import build_entry, onnx_extra, save_tiny_model, start_server


def _restore(parts: dict[str, torch.Tensor], method: str) -> torch.Tensor:
    return QuantizedWeight(method, parts["qweight"], parts["scale"], parts.get("offset")).dequantize()


def test_group_size_falls_back_to_a_divisor():
    assert group_size_for(2048, 128) == 128
    assert group_size_for(576, 128) == 64
    assert group_size_for(2048, 96) == 64  # the kernels take powers of two
    with pytest.raises(ValueError, match="no group size"):
        group_size_for(24, 128)


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_rounding_error_is_within_half_a_step(symmetric):
    w = torch.randn(64, 256)
    parts = quantize.quantize_int4(w, 64, symmetric)
    restored = _restore(parts, "int4")
    step = parts["scale"].float().repeat_interleave(64, 1)
    stored = parts["offset"].float().abs().repeat_interleave(64, 1) * 2**-10  # float16 offsets and scales
    assert ((restored - w).abs() <= step * 0.5 + stored + 16 * step * 2**-11).all()
    if symmetric:
        assert torch.equal(parts["offset"].float(), -8 * parts["scale"].float())


def test_int4_of_weights_already_on_a_4bit_grid_is_exact():
    """Asymmetric RTN recovers a grid's own codes (a Q4_1 file's: float16 scales and minimums): each
    group's min and max are grid points."""
    scale = (torch.rand(32, 4, 1) * 0.01 + 0.01).half().float()
    low = (-torch.rand(32, 4, 1)).half().float()
    codes = torch.randint(0, 16, (32, 4, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    w = (codes * scale + low).reshape(32, 128)
    restored = _restore(quantize.quantize_int4(w, 32, False), "int4")
    assert torch.allclose(restored, w, atol=1e-5)


def test_int8_and_fp8_rounding():
    w = torch.randn(48, 96)
    int8 = _restore(quantize.quantize_int8(w), "int8")
    assert ((int8 - w).abs() <= w.abs().amax(1, keepdim=True) / 254 + 1e-6).all()
    for per_channel in (True, False):
        fp8 = _restore(quantize.quantize_fp8(w, per_channel), "fp8")
        assert ((fp8 - w).abs() <= w.abs() * 2**-3 + 1e-3).all()  # E4M3 keeps 3 mantissa bits


@pytest.mark.parametrize("kv_heads", [2, 4])  # with 4 (no GQA) the output projection takes part too
def test_awq_scales_keep_the_float_model_unchanged(smollm2_source, kv_heads):
    """Folding s into the weights and 1/s into the norms and projections before them is exact in
    real arithmetic: the float model computes the same logits after it."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config("llama", len(smollm2_source[1]))
    config.num_key_value_heads = kv_heads
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = list(range(100, 400))
    inputs = quantize.collect_inputs(model, ids, chunk=128)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    alphas = quantize.apply_awq(state, inputs, model.config, QuantizeOptions("int4", group_size=32), lambda m: None)
    assert any(a > 0 for a in alphas.values()), "no layer chose a scale: the test would not test folding"
    assert ("model.layers.0.self_attn.o_proj" in alphas) == (kv_heads == 4)
    x = torch.tensor([ids[:64]])
    before = model(input_ids=x).logits
    model.load_state_dict(state)
    after = model(input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-3)


def test_awq_lowers_the_output_error_where_a_few_channels_dominate():
    torch.manual_seed(0)
    k = 256
    x = torch.randn(512, k)
    x[:, :4] *= 40  # the outlier channels AWQ exists for
    w = torch.randn(128, k) / k**0.5
    opts = QuantizeOptions("int4", group_size=128)
    inputs = quantize.LayerInputs(x.abs().mean(0), x)
    s, alpha = quantize.search_scales(inputs, [w], opts)
    plain = quantize.fake_quantize(w, opts)
    aware = quantize.fake_quantize(w * s, opts) / s
    ref = x @ w.t()
    assert alpha > 0
    assert (x @ aware.t() - ref).pow(2).mean() < 0.8 * (x @ plain.t() - ref).pow(2).mean()


def _outlier_model(folder, tokenizer):
    """A tiny Llama whose second layer has one input column 100x the rest in every projection: int4
    groups that hold it round their other weights to almost nothing, so that layer's rounding costs
    the most."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)), dtype=torch.float32).eval()
    with torch.no_grad():
        for m in model.model.layers[1].modules():
            if isinstance(m, torch.nn.Linear):
                m.weight[:, 0] *= 100
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model


def test_dense_layers_keeps_the_layer_rounding_hurts_most_and_serves_it(smollm2_source, tmp_path):
    from safetensors import safe_open

    from python_backend.engine.engine import Engine

    tokenizer = smollm2_source[1]
    model = _outlier_model(tmp_path / "src", tokenizer)
    common = ("--quantize", "int4", "--group-size", "32", "--no-awq", "--calibration-tokens", "512")
    mixed = build_entry(tmp_path / "repo", str(tmp_path / "src"), "mixed", *common, "--dense-layers", "1")
    plain = build_entry(tmp_path / "repo", str(tmp_path / "src"), "plain", *common)
    record = json.loads((mixed / "1" / "engine" / "engine.json").read_text())["quantization"]
    assert record["dense_layers"] == [1]
    assert max(range(2), key=lambda i: record["layer_kl"][i]) == 1
    with safe_open(next((mixed / "1" / "engine").glob("*.safetensors")), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.down_proj.weight" in names and "model.layers.1.mlp.down_proj.qweight" not in names
    assert "model.layers.0.mlp.down_proj.qweight" in names and "model.layers.0.mlp.down_proj.weight" not in names
    ids = list(range(200, 264))
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)

    def error(entry) -> float:
        engine = Engine.from_folder(entry / "1" / "engine", capture_graphs_at_start=False)
        got = torch.log_softmax(engine.prompt_logits(ids).float(), -1)
        return (got - want).abs().mean().item()

    assert error(mixed) < 0.5 * error(plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_layers_start_on_the_gpu_and_decode_as_the_untuned_path(tmp_path):
    """Start-up timing tunes the quantized projections and leaves the dense layer among them to
    cuBLAS; the tuned decode picks the tokens the untuned one picks."""
    from transformers import AutoTokenizer

    from python_backend.engine.engine import Engine
    from python_backend.engine.sequence import SamplingParams

    if not os.environ.get("FASTSERVE_TEST_TOKENIZER"):
        pytest.skip("set FASTSERVE_TEST_TOKENIZER to a folder with tokenizer files")
    _outlier_model(tmp_path / "src", AutoTokenizer.from_pretrained(os.environ["FASTSERVE_TEST_TOKENIZER"]))
    entry = build_entry(
        tmp_path / "repo", str(tmp_path / "src"), "mixed", "--quantize", "int8", "--dense-layers", "1",
        "--calibration-tokens", "512", "--dtype", "bfloat16",
    )  # fmt: skip
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    texts = []
    for tuned in (True, False):
        engine = Engine.from_folder(entry / "1" / "engine", device="cuda", decode_gemv=tuned, num_kv_blocks=64)
        assert bool(engine.gemv_timings) == tuned
        texts.append([r.token_ids for r in engine.generate([list(range(200, 232))], params)])
        engine.shutdown()
    assert texts[0] == texts[1]


def test_dense_layers_needs_a_quantized_build_and_a_layer_left(tmp_path, smollm2_source, capsys):
    from builders.build import main

    folder = save_tiny_model(tmp_path / "hf", "llama", smollm2_source[1])
    args = ["--model", str(folder), "--name", "x", "--repository", str(tmp_path / "r")]
    assert main([*args, "--dense-layers", "1"]) == 2 and "--quantize is none" in capsys.readouterr().err
    assert main([*args, "--quantize", "int8", "--dense-layers", "2"]) == 2
    assert "leaves none of the 2 layers quantized" in capsys.readouterr().err
    assert not (tmp_path / "r" / "x").exists()


def test_calibration_and_evaluation_text_are_disjoint_and_stable():
    cal, ev = corpus("calibration"), corpus("evaluation")
    assert len(cal.text) > 100_000 and len(ev.text) > 100_000
    assert not set(cal.modules) & set(ev.modules)
    assert not set(cal.text.split("\n\n")) & set(ev.text.split("\n\n"))
    assert corpus("evaluation").sha256 == ev.sha256
    assert ev.record()["sha256"] == ev.sha256


@pytest.fixture(scope="session")
def quantized_repo(tmp_path_factory):
    """SmolLM2 as int8, int4 (AWQ) and the GGUF file's own Q4_1 blocks. int4 takes
    groups of 32: the file's weights already lie on a 4-bit grid of 32-weight blocks, which wider
    groups would round a second time. int4 computes in float32: the chat question's first answer
    token is a near tie ("The" against "L", about 0.24 nats apart in float32), and in bfloat16,
    whose steps are 0.125 at these logits, the CPU's own kernels decide it: the two came out equal
    on one CPU and apart on another. Where the onnx extra is installed the GGUF build also carries
    its ONNX graph (MatMulNBits, float32 products), and the same build is served a second time as
    gguf_onnx, its runner set to onnxruntime in its config.pbtxt as a user would."""
    repo = tmp_path_factory.mktemp("quantized")
    build_entry(repo, "smollm2", "int8", "--dtype", "bfloat16", "--quantize", "int8", "--max-num-seqs", "8")
    build_entry(
        repo, "smollm2", "int4", "--dtype", "float32", "--quantize", "int4", "--group-size", "32",
        "--calibration-tokens", "1024", "--max-num-seqs", "8",
    )  # fmt: skip
    graph = ("--backend", "onnx", "--runner", "pytorch", "--no-int8-activations") if onnx_extra() else ()
    build_entry(repo, "smollm2", "gguf", "--dtype", "float32", "--quantize", "gguf", "--max-num-seqs", "8", *graph)
    if graph:
        shutil.copytree(repo / "gguf", repo / "gguf_onnx", copy_function=os.link)
        config = repo / "gguf_onnx" / "config.pbtxt"
        text = config.read_text().replace('name: "gguf"', 'name: "gguf_onnx"')
        config.unlink()  # a hard link to the first entry's file
        config.write_text(text.replace('string_value: "pytorch"', 'string_value: "onnxruntime"'))
    return repo


def test_gguf_blocks_are_the_files_weights_exactly(quantized_repo, smollm2_source):
    from safetensors.torch import load_file

    meta = json.loads((quantized_repo / "gguf" / "1" / "engine" / "engine.json").read_text())
    assert meta["quantization"]["source"] == "gguf" and meta["quantization"]["gguf_types"] == ["Q4_1"]
    stored = load_file(str(quantized_repo / "gguf" / "1" / "engine" / "model.safetensors"))
    reference = smollm2_source[0].state_dict()
    names = [k[: -len(".qweight")] for k in stored if k.endswith(".qweight")]
    assert len(names) == 30 * 7
    for name in names:
        parts = {p: stored[f"{name}.{p}"] for p in ("qweight", "scale", "offset")}
        assert torch.equal(_restore(parts, "int4"), reference[f"{name}.weight"]), name


def test_gguf_q4_0_blocks_decode_to_their_weights():
    """Q4_0: a float16 d and 16 bytes of codes per 32 weights, w = d * (q - 8); the low nibble of byte j
    is weight j, the high nibble weight j + 16."""
    import numpy as np

    n, k = 3, 64
    d = (np.random.default_rng(0).random((n, k // 32)) * 0.1 + 0.01).astype(np.float16)
    codes = np.random.default_rng(1).integers(0, 16, (n, k // 32, 32)).astype(np.uint8)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    raw = np.concatenate([d[..., None].view(np.uint8), qs], axis=-1)
    parts = quantize.gguf_block_codes(raw, "Q4_0", n, k)
    want = (codes.astype(np.float32) - 8) * d.astype(np.float32)[..., None]
    assert torch.equal(_restore(parts, "int4"), torch.from_numpy(want.reshape(n, k)))


def test_gguf_method_needs_a_gguf_source(tmp_path, smollm2_source, capsys):
    from builders.build import main

    folder = save_tiny_model(tmp_path / "hf", "llama", smollm2_source[1])
    code = main(["--model", str(folder), "--name", "x", "--repository", str(tmp_path / "r"), "--quantize", "gguf"])
    assert code == 2 and "is not GGUF" in capsys.readouterr().err
    code = main(["--model", str(folder), "--name", "x", "--repository", str(tmp_path / "r"), "--quantize", "fp8"])
    assert code == 2 and "--device gpu" in capsys.readouterr().err
    args = ["--model", str(folder), "--name", "x", "--repository", str(tmp_path / "r"), "--quantize", "int4"]
    assert main([*args, "--group-size", "96"]) == 2 and "power of two" in capsys.readouterr().err
    assert main([*args, "--no-int8-activations"]) == 2 and "needs --backend onnx" in capsys.readouterr().err
    assert not (tmp_path / "r" / "x").exists()


def test_evaluate_reports_quality_size_and_agreement(quantized_repo, smollm2_repo, tmp_path):
    from fastserve.cli import main

    out = tmp_path / "eval.json"
    args = ["evaluate", str(quantized_repo / "int8"), str(quantized_repo / "gguf"), "--against"]
    args += [str(smollm2_repo / "smollm2"), "--eval-tokens", "1024", "--agreement-prompts", "4", "--no-speed"]
    args += ["--runner", "pytorch"]  # the PyTorch runner's figures; the same build's graph is served as gguf_onnx
    assert main([*args, "--out", str(out)]) == 0
    int8, gguf = json.loads(out.read_text())
    for r in (int8, gguf):
        assert r["text"]["split"] == "evaluation" and len(r["text"]["sha256"]) == 64 and r["eval_tokens"] == 1024
        assert r["agreement_positions"] == 4 * 64
        assert 1 < r["perplexity"] < 100
    assert int8["quantization"] == "int8" and gguf["quantization"] == "int4-gguf"
    assert abs(int8["perplexity_ratio"] - 1) < 0.01 and int8["agreement"] >= 0.9
    # the GGUF build holds the very weights of the float32 reference: the two agree to rounding
    assert abs(gguf["perplexity_ratio"] - 1) < 0.001 and gguf["agreement"] >= 0.98
    f32_bytes = sum(f.stat().st_size for f in (smollm2_repo / "smollm2" / "1" / "engine").glob("*.safetensors"))
    assert int8["weights_bytes_on_disk"] < 0.75 * f32_bytes / 2


def test_builder_evaluate_flag_stores_the_result(smollm2_source, tmp_path):
    folder = save_tiny_model(tmp_path / "src", "llama", smollm2_source[1], seed=2)
    entry = build_entry(tmp_path / "repo", str(folder), "t", "--quantize", "int8", "--evaluate")
    meta = json.loads((entry / "1" / "engine" / "engine.json").read_text())
    assert meta["evaluation"]["quantization"] == "int8" and meta["evaluation"]["perplexity"] > 1
    assert meta["evaluation"]["single_stream_tok_s"] > 0


@pytest.fixture(scope="module")
def quantized_server(quantized_repo):
    server = start_server(quantized_repo)
    yield server
    server.stop()


@pytest.mark.parametrize("name", ["int8", "int4", "gguf", "gguf_onnx"])
def test_quantized_builds_answer_through_tritonserver(quantized_server, quantized_repo, name):
    from clients.client import Client

    if not (quantized_repo / name).is_dir():
        pytest.skip("the onnx extra is not installed (pip install -e .[onnx])")

    c = Client(quantized_server.grpc_url, "grpc", name)
    answer = c.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=40, temperature=0.0)
    assert "Paris" in answer.text and answer.finish_reason == "stop", answer.text
    pieces = list(c.stream("The capital of France is", max_tokens=8, temperature=0.0))
    assert len(pieces) > 1
    if name == "gguf_onnx":
        assert f"onnxruntime runs {quantized_repo / name}" in quantized_server.log()
        # float32 products over the same codes: a client cannot tell which runner answers
        same = Client(quantized_server.grpc_url, "grpc", "gguf")
        question = [{"role": "user", "content": "What is the capital of France?"}]
        assert same.chat(question, max_tokens=40, temperature=0.0).text == answer.text
        graph = json.loads((quantized_repo / name / "1" / "engine" / "engine.json").read_text())["graph"]
        assert graph["weights"] == {"operator": "MatMulNBits", "accuracy_level": 0} and "check_served" not in graph
