"""The builder: sources, the engine folder, atomicity, and round trips through transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from builders.build import main as build_main
from python_backend.engine.config import EngineConfig
from tests.conftest import ROOT, TEST_KV_CACHE_GB, build_entry, prompt_ids, save_tiny_model


def _greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_smollm2_entry_layout(smollm2_repo):
    entry = smollm2_repo / "smollm2"
    engine = entry / "1" / "engine"
    meta = json.loads((engine / "engine.json").read_text())
    assert meta["architecture"] == "LlamaForCausalLM"
    assert meta["dtype"] == "float32"
    assert meta["max_model_len"] == 8192
    assert meta["eos_token_ids"] == [2]
    assert len(meta["source_hash"]) == 64
    assert (engine / "model.safetensors").is_file() and (engine / "tokenizer.json").is_file()
    assert meta["has_chat_template"]
    config = (entry / "config.pbtxt").read_text()
    for needle in (
        'backend: "python"',
        "decoupled: true",
        "dynamic_batching",
        'name: "text_input"',
        'name: "text_output"',
        "KIND_CPU",
        'key: "engine_dir"',
        'key: "kv_cache_gb"',
    ):
        assert needle in config
    assert "from python_backend.model import TritonPythonModel" in (entry / "1" / "model.py").read_text()
    assert not list((entry / "1").glob(".engine.tmp-*"))


def test_smollm2_weights_round_trip(smollm2_engine_dir, smollm2_source, prompt_set):
    """Weights written by the builder, loaded back into transformers, continue every prompt the same."""
    source, tok = smollm2_source
    built = AutoModelForCausalLM.from_pretrained(smollm2_engine_dir, dtype=torch.float32).eval()
    for p in prompt_set:
        ids = prompt_ids(tok, p)
        assert _greedy(built, ids, 32) == _greedy(source, ids, 32), p["id"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_local_folder_builds(tmp_path, arch, smollm2_source):
    _, tok = smollm2_source
    folder = save_tiny_model(tmp_path / f"tiny-{arch}", arch, tok)
    entry = build_entry(tmp_path / "repo", str(folder), f"tiny-{arch}")
    engine = entry / "1" / "engine"
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    built = AutoModelForCausalLM.from_pretrained(engine, dtype=torch.float32).eval()
    ids = tok("The quick brown fox").input_ids
    assert _greedy(built, ids, 16) == _greedy(source, ids, 16)
    assert json.loads((engine / "engine.json").read_text())["max_model_len"] == 512


def _fails(tmp_path, model: str, capsys) -> str:
    repo = tmp_path / "repo"
    code = build_main(["--model", model, "--name", "bad", "--repository", str(repo)])
    assert code != 0
    assert not (repo / "bad").exists(), "a failed build must leave no entry behind"
    return capsys.readouterr().err


def test_unsupported_architecture(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    err = _fails(tmp_path, str(folder), capsys)
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err


def test_missing_config(tmp_path, capsys):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert "config.json is missing" in _fails(tmp_path, str(folder), capsys)


def test_missing_tokenizer(tmp_path, smollm2_source, capsys):
    folder = save_tiny_model(tmp_path / "notok", "llama", smollm2_source[1])
    for f in folder.glob("tokenizer*"):
        f.unlink()
    assert "no tokenizer files" in _fails(tmp_path, str(folder), capsys)


def test_corrupt_safetensors(tmp_path, smollm2_source, capsys):
    folder = save_tiny_model(tmp_path / "corrupt", "llama", smollm2_source[1])
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = _fails(tmp_path, str(folder), capsys)
    assert "model.safetensors" in err and "corrupt" in err


def test_hub_id_unreachable_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _fails(tmp_path, "someorg/some-model", capsys)
    assert "local folder" in err


def test_rebuild_skipped_unless_forced(tmp_path, smollm2_source, capsys):
    folder = save_tiny_model(tmp_path / "tiny", "llama", smollm2_source[1])
    repo = tmp_path / "repo"
    build_entry(repo, str(folder), "tiny")
    weights = repo / "tiny" / "1" / "engine" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    capsys.readouterr()
    build_entry(repo, str(folder), "tiny")
    assert "up to date" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == first
    build_entry(repo, str(folder), "tiny", "--force")
    assert weights.stat().st_mtime_ns != first


def test_failed_rebuild_keeps_previous_engine(tmp_path, smollm2_source):
    folder = save_tiny_model(tmp_path / "tiny", "llama", smollm2_source[1])
    repo = tmp_path / "repo"
    build_entry(repo, str(folder), "tiny")
    code = build_main(
        ["--model", str(folder), "--name", "tiny", "--repository", str(repo), "--max-model-len", "99999", "--force"]
    )
    assert code != 0
    assert (repo / "tiny" / "1" / "engine" / "engine.json").is_file()
    assert not list((repo / "tiny" / "1").glob(".engine.tmp-*"))


def test_script_entry_point(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "builders/build.py",
            "--model",
            str(tmp_path / "nope"),
            "--name",
            "x",
            "--repository",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr


@pytest.mark.parametrize("path", ["config.pbtxt", "1/model.py"])
def test_checked_in_entry_is_what_the_builder_writes(smollm2_repo, path):
    """model_repository/smollm2/ is the builder's output for SmolLM2 with the defaults (the suite's
    entries differ only in their smaller KV cache)."""
    checked_in = ROOT / "model_repository" / "smollm2" / path
    built = (smollm2_repo / "smollm2" / path).read_text()
    kv = 'key: "kv_cache_gb" value: { string_value: "%s" }'
    built = built.replace(kv % TEST_KV_CACHE_GB, kv % EngineConfig().kv_cache_gb)
    assert built == checked_in.read_text(), (
        "rebuild it: python builders/build.py --model smollm2 --name smollm2 --repository model_repository"
    )
