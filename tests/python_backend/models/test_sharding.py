"""Tensor-parallel weight slices: together they are the whole model, and the row-parallel partial
products add up to the full one, also where heads do not split evenly."""

from __future__ import annotations

import pytest
import torch

from python_backend.models.llama import ModelConfig
from python_backend.models.sharding import Shard, ShardingError, shard_weights, split

CFG = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=100, hidden_size=48, intermediate_size=40, num_layers=1,
    num_heads=6, num_kv_heads=3, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
    max_position_embeddings=64, tie_word_embeddings=True,
)  # fmt: skip


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    a, m = "model.layers.0.self_attn.", "model.layers.0.mlp."
    q, kv, ffn, hidden = CFG.num_heads * CFG.head_dim, CFG.num_kv_heads * CFG.head_dim, 40, 48
    return {
        "model.embed_tokens.weight": torch.randn(CFG.vocab_size, hidden) * 0.1,
        "model.norm.weight": torch.randn(hidden) * 0.1,
        a + "q_proj.weight": torch.randn(q, hidden) * 0.1,
        a + "k_proj.weight": torch.randn(kv, hidden) * 0.1,
        a + "v_proj.weight": torch.randn(kv, hidden) * 0.1,
        a + "o_proj.weight": torch.randn(hidden, q) * 0.1,
        m + "gate_proj.weight": torch.randn(ffn, hidden) * 0.1,
        m + "up_proj.weight": torch.randn(ffn, hidden) * 0.1,
        m + "down_proj.weight": torch.randn(hidden, ffn) * 0.1,
    }


def test_split_covers_every_item_once():
    for n, world in ((3, 2), (9, 4), (8, 2), (5, 5)):
        parts = [split(n, world, r) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


@pytest.mark.parametrize("world", [2, 3])
def test_shards_rebuild_the_model_and_partials_sum_to_the_full_product(world):
    w = _weights()
    a, m = "model.layers.0.self_attn.", "model.layers.0.mlp."
    shards = [shard_weights(w, CFG, Shard(r, world)) for r in range(world)]
    locals_ = [Shard(r, world).local_config(CFG) for r in range(world)]
    assert sum(c.num_kv_heads for c in locals_) == CFG.num_kv_heads
    assert all(c.num_heads == 2 * c.num_kv_heads for c in locals_)  # whole GQA groups per rank
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(torch.cat([s[a + name + ".weight"] for s in shards]), w[a + name + ".weight"])
    assert torch.equal(torch.cat([s["lm_head.weight"] for s in shards]), w["model.embed_tokens.weight"])
    for s, c in zip(shards, locals_):
        assert s[a + "q_proj.weight"].shape[0] == c.num_heads * CFG.head_dim
        assert s[m + "gate_proj.weight"].shape[0] == c.intermediate_size
        assert torch.equal(s["model.embed_tokens.weight"], w["model.embed_tokens.weight"])  # replicated
    x_attn = torch.randn(5, CFG.num_heads * CFG.head_dim)
    q_rows = [s[a + "q_proj.weight"].shape[0] for s in shards]
    partial = sum(xs @ s[a + "o_proj.weight"].t() for xs, s in zip(x_attn.split(q_rows, dim=1), shards))
    torch.testing.assert_close(partial, x_attn @ w[a + "o_proj.weight"].t())
    x_mlp = torch.randn(5, 48)
    act = [torch.nn.functional.silu(x_mlp @ s[m + "gate_proj.weight"].t()) * (x_mlp @ s[m + "up_proj.weight"].t())
           for s in shards]  # fmt: skip
    full_act = torch.nn.functional.silu(x_mlp @ w[m + "gate_proj.weight"].t()) * (x_mlp @ w[m + "up_proj.weight"].t())
    down = sum(h @ s[m + "down_proj.weight"].t() for h, s in zip(act, shards))
    torch.testing.assert_close(down, full_act @ w[m + "down_proj.weight"].t())


def test_more_ranks_than_kv_heads_and_quantized_weights_are_refused():
    with pytest.raises(ShardingError, match="at least as many KV heads"):
        shard_weights(_weights(), CFG, Shard(0, 4))
    quantized = {**_weights(), "model.layers.0.mlp.down_proj.qweight": torch.zeros(1, dtype=torch.int8)}
    with pytest.raises(ShardingError, match="dense weights"):
        shard_weights(quantized, CFG, Shard(0, 2))
