"""Which part of each weight a tensor-parallel rank holds (Megatron-style splits of a Llama block).

Attention is split by KV heads, each rank taking whole GQA groups: its query heads are the ones that
read its KV heads, so attention needs nothing from other ranks. Q, K and V are split by output rows
(column-parallel), the output projection by input columns (row-parallel): each rank's product is a
partial sum of the full one, added up by one all-reduce. The MLP likewise: gate and up by rows, down
by columns, one all-reduce. The LM head is split by vocabulary rows and the logits gathered. The
embedding, norms and rotary tables are replicated.

Splits need not be even: SmolLM2's 3 KV heads go 2 and 1 over two ranks. Each rank's KV cache holds
only its heads, so the cache's memory divides with the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from python_backend.models.llama import ModelConfig


class ShardingError(ValueError):
    pass


def split(n: int, world: int, rank: int) -> tuple[int, int]:
    """The [start, stop) of rank's part of n items over `world` ranks, as even as possible."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    def check(self, cfg: ModelConfig) -> None:
        if self.world > cfg.num_kv_heads:
            raise ShardingError(
                f"tensor parallelism over {self.world} ranks needs at least as many KV heads; the model has "
                f"{cfg.num_kv_heads}"
            )

    def kv_heads(self, cfg: ModelConfig) -> tuple[int, int]:
        return split(cfg.num_kv_heads, self.world, self.rank)

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The rank's model: its heads and FFN channels; the vocabulary stays whole (logits are gathered)."""
        lo, hi = self.kv_heads(cfg)
        group = cfg.num_heads // cfg.num_kv_heads
        f_lo, f_hi = split(cfg.intermediate_size, self.world, self.rank)
        return replace(
            cfg,
            num_heads=group * (hi - lo),
            num_kv_heads=hi - lo,
            intermediate_size=f_hi - f_lo,
            tie_word_embeddings=False,
        )

    def vocab(self, cfg: ModelConfig) -> tuple[int, int]:
        return split(cfg.vocab_size, self.world, self.rank)


def shard_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig, shard: Shard) -> dict[str, torch.Tensor]:
    """The rank's slices of a dense Llama checkpoint (engine folder names)."""
    if any(name.endswith(".qweight") for name in weights):
        raise ShardingError("tensor parallelism takes dense weights; this build is quantized")
    shard.check(cfg)
    hd, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    lo, hi = shard.kv_heads(cfg)
    q_rows = slice(group * lo * hd, group * hi * hd)
    kv_rows = slice(lo * hd, hi * hd)
    ffn = slice(*split(cfg.intermediate_size, shard.world, shard.rank))
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        part = name.rsplit(".", 2)
        role = ".".join(part[-2:]) if len(part) >= 2 else name
        if role in ("q_proj.weight", "q_proj.bias"):
            t = t[q_rows]
        elif role in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            t = t[kv_rows]
        elif role == "o_proj.weight":
            t = t[:, q_rows]
        elif role in ("gate_proj.weight", "up_proj.weight"):
            t = t[ffn]
        elif role == "down_proj.weight":
            t = t[:, ffn]
        elif role in ("o_proj.bias", "down_proj.bias"):
            raise ShardingError(f"{name}: a bias after a row-parallel product is not supported")
        elif name == "lm_head.weight":
            continue
        out[name] = t.contiguous()
    head = weights.get("lm_head.weight")
    if head is None or cfg.tie_word_embeddings:
        head = weights["model.embed_tokens.weight"]
    v_lo, v_hi = shard.vocab(cfg)
    out["lm_head.weight"] = head[v_lo:v_hi].contiguous()
    return out
