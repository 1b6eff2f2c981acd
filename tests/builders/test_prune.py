"""Pruning in the builder: the masks, the structured cut (checked against the original model with
the removed heads and channels silenced), and pruned builds that the engine serves exactly as
transformers runs the pruned model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from builders import prune
from builders.build import main as build_main
from tests.conftest import build_entry, prompt_ids, save_tiny_model


def test_magnitude_mask_drops_exactly_the_smallest():
    w = torch.tensor([[0.5, -0.1, 2.0, -3.0], [0.05, 1.0, -0.2, 0.3]])
    keep = prune.magnitude_mask(w, 0.5)
    assert keep.tolist() == [[True, False, True, True], [False, True, False, False]]  # the four smallest of the matrix
    assert prune.magnitude_mask(w, 0.0).all()


def test_two_of_every_four_survive_and_they_are_the_largest():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    keep = prune.semi_structured_mask(w)
    groups, kept = w.abs().reshape(8, 8, 4), keep.reshape(8, 8, 4)
    assert (kept.sum(-1) == 2).all()
    smallest_kept = torch.where(kept, groups, torch.inf).amin(-1)
    largest_dropped = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (smallest_kept >= largest_dropped).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        prune.semi_structured_mask(torch.ones(2, 6))


def test_heads_are_chosen_within_each_kv_group():
    scores = torch.tensor([0.1, 0.9, 0.5, 3.0, 0.2, 0.1])  # two KV groups of three query heads
    assert prune.kept_heads(scores, kv_heads=2, keep_per_group=2) == [1, 2, 3, 4]


def test_structured_counts_for_smollm2_at_a_quarter():
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, hidden_size=576)
    assert prune.structured_counts(cfg, 0.25) == (2, 1152)  # 2 of 3 query heads per group
    assert prune.structured_counts(cfg, 0.0) == (3, 1536)


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        prune.check(prune.PruneOptions("magnitude", 1.0))
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune.check(prune.PruneOptions("lottery", 0.5))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_source):
    folder = save_tiny_model(tmp_path_factory.mktemp("prune") / "tiny", "llama", smollm2_source[1], seed=3)
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def test_structured_pruning_is_the_original_with_the_cut_parts_silenced(tiny_model, smollm2_source):
    """The smaller model computes what the original computes with the removed query heads' output
    columns and the removed channels' down-projection columns set to zero."""
    import copy

    _, model = tiny_model
    ids = smollm2_source[1]("The quick brown fox jumps over the lazy dog. " * 20).input_ids
    small, record = prune.prune_structured(copy.deepcopy(model), prune.PruneOptions("structured", 0.5), ids, log=print)
    cfg = model.config
    assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 2)
    assert small.config.intermediate_size == 64 and small.config.head_dim == cfg.hidden_size // 4
    assert record["parameters"][1] < record["parameters"][0]
    importance = prune.measure_importance(model, ids)
    silenced = copy.deepcopy(model)
    hd = small.config.head_dim
    for i, layer in enumerate(silenced.model.layers):
        heads = prune.kept_heads(importance.heads[i], 2, 1)
        for h in set(range(4)) - set(heads):
            layer.self_attn.o_proj.weight[:, h * hd : (h + 1) * hd] = 0
        channels = set(importance.channels[i].topk(64).indices.tolist())
        for c in set(range(128)) - channels:
            layer.mlp.down_proj.weight[:, c] = 0
    x = torch.tensor([ids[:40]])
    torch.testing.assert_close(small(x).logits, silenced(x).logits, rtol=1e-4, atol=1e-4)


def test_pruned_builds_serve_as_transformers_runs_them(tiny_model, tmp_path, smollm2_source):
    """Built with --prune structured and --prune 2:4, float32: the engine's greedy output is the
    transformers model's own, token for token, and engine.json records the pruning (2:4 with the
    sparse kernels asked for, which this CPU does not have)."""
    from python_backend.engine.engine import Engine, EngineConfig
    from python_backend.engine.sequence import SamplingParams

    folder, _ = tiny_model
    tok = smollm2_source[1]
    prompt = prompt_ids(tok, {"kind": "completion", "text": "Once upon a time there was"})
    for method, extra in (("structured", ["--sparsity", "0.5"]), ("2:4", [])):
        name = method.replace(":", "of")
        entry = build_entry(tmp_path, str(folder), name, "--prune", method, *extra, "--calibration-tokens", "256")
        engine_dir = entry / "1" / "engine"
        meta = json.loads((engine_dir / "engine.json").read_text())
        assert meta["pruning"]["method"] == method
        reference = AutoModelForCausalLM.from_pretrained(engine_dir, dtype=torch.float32).eval()
        if method == "2:4":
            assert meta["pruning"]["projection_sparsity"] == pytest.approx(0.5)
            w = reference.model.layers[0].mlp.up_proj.weight
            assert ((w.reshape(-1, 4) != 0).sum(-1) <= 2).all()
        else:
            assert json.loads((engine_dir / "config.json").read_text())["intermediate_size"] == 64
            assert meta["num_parameters"] == meta["pruning"]["parameters"][1]
        want = _greedy(reference, prompt, 12)
        # sparse kernels asked for: a CPU has none, so the 2:4 weights run as the dense ones they are
        config = EngineConfig(device="cpu", dtype="float32", kv_cache_gb=0.05, sparse_kernels=True)
        engine = Engine(engine_dir, config)
        try:
            got = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
        finally:
            engine.shutdown()
        assert got.token_ids == want, method


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, past EOS too (as the engine's ignore_eos)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_bad_pruning_requests_are_refused_before_any_work(tiny_model, tmp_path, capsys):
    folder, _ = tiny_model
    args = ["--model", str(folder), "--name", "x", "--repository", str(tmp_path / "r"), "--prune", "magnitude"]
    assert build_main([*args, "--sparsity", "1.0"]) == 2
    assert "must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_main([*args, "--sparsity", "-0.5"])
    assert "must be at least 0" in capsys.readouterr().err
    assert not (tmp_path / "r" / "x").exists()
