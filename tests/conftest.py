"""Shared fixtures: a real tritonserver on free ports, the project's prompts, the SmolLM2 file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from python_backend.serve import TritonServer, free_port

try:  # without a GPU, the Triton kernels' tests run in Triton's interpreter; set before any kernel is defined
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

# engines started by the tests take CPU turns among themselves, not with a user's servers on the host
os.environ.setdefault("FASTSERVE_CPU_LOCK", os.path.join(tempfile.mkdtemp(prefix="fastserve-tests-"), "cpu.lock"))

ROOT = Path(__file__).resolve().parent.parent
TEST_REPOS = Path(__file__).resolve().parent / "repos"


def start_server(repository: Path, **kw) -> TritonServer:
    """A real tritonserver on free ports; the caller stops it."""
    return TritonServer(
        repository=repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), **kw
    ).start(timeout=600)


@pytest.fixture(scope="session")
def echo_server():
    server = start_server(TEST_REPOS / "good")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prompt_set() -> list[dict]:
    """The project's prompts for exactness checks: chat and completion, English and Chinese."""
    path = Path(__file__).resolve().parent / "data" / "prompts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def onnx_extra() -> bool:
    """What --backend onnx needs is installed (the onnx extra)."""
    import importlib.util

    from builders.graph import ONNX_MODULES

    return all(importlib.util.find_spec(m) is not None for m in ONNX_MODULES)


TEST_KV_CACHE_GB = "0.25"


def build_entry(repository: Path, model: str, name: str, *extra: str) -> Path:
    """Run the real builder (the same code as `python builders/build.py`). Unless told otherwise,
    the entry's CPU KV cache is 0.25 GiB (about 5,800 SmolLM2 float32 tokens): the default 2 GiB,
    zeroed and held by every loaded entry of every server a test session keeps up, would not fit
    in the machine's memory."""
    from builders.build import main

    if "--kv-cache-gb" not in extra:
        extra = ("--kv-cache-gb", TEST_KV_CACHE_GB, *extra)
    code = main(["--model", model, "--name", name, "--repository", str(repository), *extra])
    assert code == 0, f"build of {model} failed with code {code}"
    return repository / name


@pytest.fixture(scope="session")
def smollm2_repo(tmp_path_factory) -> Path:
    """A repository with SmolLM2 built in float32 (exact comparisons with transformers need float32)."""
    repo = tmp_path_factory.mktemp("repo")
    build_entry(repo, "smollm2", "smollm2", "--dtype", "float32")
    return repo


@pytest.fixture(scope="session")
def smollm2_engine_dir(smollm2_repo) -> Path:
    return smollm2_repo / "smollm2" / "1" / "engine"


@pytest.fixture(scope="session")
def smollm2_source():
    """SmolLM2 as transformers loads it from the GGUF file: the reference model and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from builders.sources import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tok


def prompt_ids(tokenizer, prompt: dict) -> list[int]:
    """Token ids of a test prompt: chat prompts through the chat template, others as plain text."""
    if prompt["kind"] == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt["text"]}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt["text"]
    return tokenizer(text, add_special_tokens=False).input_ids


def tiny_config(arch: str, vocab_size: int):
    """A small random-initialised config of a real architecture."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    if arch == "mistral":
        extra["sliding_window"] = None
    return cls(**common, **extra)


def save_tiny_model(folder: Path, arch: str, tokenizer, seed: int = 0) -> Path:
    """A random-initialised HF model folder (config, safetensors, tokenizer) of a real architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def serving_repo(smollm2_repo, smollm2_source, tmp_path_factory) -> Path:
    """SmolLM2, again as its ONNX graph served by ONNX Runtime (smollm2_onnx), again split over two
    tensor-parallel ranks (smollm2_tp2), a tiny random model whose queue holds only 4 requests (to see
    UNAVAILABLE), and the tiny model again under the MLFQ scheduler, streaming one response per 4
    tokens."""
    build_entry(smollm2_repo, "smollm2", "smollm2_tp2", "--dtype", "float32", "--tensor-parallel", "2")
    if onnx_extra():
        build_entry(smollm2_repo, "smollm2", "smollm2_onnx", "--dtype", "float32", "--backend", "onnx")
    tmp = tmp_path_factory.mktemp("tiny-src")
    folder = save_tiny_model(tmp / "tiny", "llama", smollm2_source[1], seed=5)
    build_entry(smollm2_repo, str(folder), "tiny", "--max-queue-size", "4", "--max-num-seqs", "2")
    build_entry(
        smollm2_repo,
        str(folder),
        "tiny_mlfq",
        "--scheduler",
        "mlfq",
        "--max-num-seqs",
        "2",
        "--swap-space-gb",
        "0.01",
        "--mlfq-base-quantum-s",
        "0.002",
        "--mlfq-levels",
        "5",
        "--stream-interval",
        "4",
    )
    return smollm2_repo


def tiny_onnx_build(tmp_path_factory, tokenizer, *extra: str) -> Path:
    if not onnx_extra():
        pytest.skip("the onnx extra is not installed (pip install -e .[onnx])")
    tmp = tmp_path_factory.mktemp("tiny-onnx")
    folder = save_tiny_model(tmp / "src", "llama", tokenizer, seed=11)
    return build_entry(tmp / "repo", str(folder), "tiny", "--backend", "onnx", *extra)


@pytest.fixture(scope="session")
def tiny_onnx_entry(tmp_path_factory, smollm2_source) -> Path:
    """A tiny random Llama built with --backend onnx: its safetensors and its checked ONNX graph."""
    return tiny_onnx_build(tmp_path_factory, smollm2_source[1])


@pytest.fixture(scope="session")
def tiny_onnx_int4_entry(tmp_path_factory, smollm2_source) -> Path:
    """The tiny random Llama built with --backend onnx --quantize int4: MatMulNBits in the graph."""
    return tiny_onnx_build(tmp_path_factory, smollm2_source[1], "--quantize", "int4", "--group-size", "32")


@pytest.fixture(scope="session")
def smollm2_server(serving_repo):
    server = start_server(serving_repo)
    yield server
    server.stop()


def run_staggered(engine, prompts: list[list[int]], params, every: int = 2, per_step: int = 1) -> list:
    """Submit `per_step` prompts every `every` engine steps, so prefills, decodes (and, under the MLFQ,
    preemptions) share iterations; results in prompt order."""
    from python_backend.engine.engine import Result

    results = [Result() for _ in prompts]
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_work():
        if step % every == 0:
            for _ in range(min(per_step, len(pending))):
                i, ids = pending.pop(0)
                engine.add_request(f"r{i}", ids, params, results[i].collect)
        engine.step()
        step += 1
    return results


@pytest.fixture(scope="session")
def small_gpu_engine_dir(tmp_path_factory) -> Path:
    """A small random Llama-shaped model in float32, built for the GPU (GPU tests only)."""
    import os

    from builders.build import main as build
    from builders.random_model import make

    tok = os.environ.get("FASTSERVE_TEST_TOKENIZER")
    if not tok:
        pytest.skip("set FASTSERVE_TEST_TOKENIZER to a folder with tokenizer files")
    tmp = tmp_path_factory.mktemp("small-gpu")
    make(
        "llama-3.2-1b",
        Path(tok),
        tmp / "src",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=49152,
        tie_word_embeddings=False,
    )
    assert (
        build(
            [
                "--model",
                str(tmp / "src"),
                "--name",
                "m",
                "--repository",
                str(tmp / "repo"),
                "--device",
                "gpu",
                "--dtype",
                "float32",
                "--max-model-len",
                "1024",
            ]
        )
        == 0
    )
    return tmp / "repo" / "m" / "1" / "engine"


FRONT_KEY = "test-key-0123456789"
FRONT_OTHER_KEY = "test-key-second-0001"
FRONT_LIMIT = 3
FRONT_BODY_LIMIT = 65536


@pytest.fixture(scope="session")
def front(serving_repo, tmp_path_factory):
    """`fastserve serve` with two keys, a limit of 3 concurrent requests per key and 64 KiB bodies, on a
    repository of the serving entries plus a pool of two of them."""
    from builders.pool import build_pool
    from python_backend.serve import ServeProcess

    repo = tmp_path_factory.mktemp("front") / "repo"
    repo.mkdir()
    for entry in ("smollm2", "tiny", "tiny_mlfq"):
        (repo / entry).symlink_to(serving_repo / entry, target_is_directory=True)
    build_pool(repo, "pool", {"members": ["tiny", "tiny_mlfq"], "cache_size": 0})
    args = ["--api-key", FRONT_KEY, "--max-streams-per-key", str(FRONT_LIMIT)]
    args += ["--max-body-bytes", str(FRONT_BODY_LIMIT)]
    serve = ServeProcess(repo, repo.parent / "serve.log", args, {"FASTSERVE_API_KEY": FRONT_OTHER_KEY})
    serve.url = f"{serve.openai_url}/v1"  # where the openai package is pointed
    serve.wait_ready(600)
    yield serve
    serve.stop()
