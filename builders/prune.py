"""Pruning for the builder: unstructured magnitude pruning, 2:4 semi-structured pruning, and
structured pruning that removes whole query heads and FFN channels.

Magnitude and 2:4 pruning zero weights of the seven projections of every decoder layer and keep
the model's shape: magnitude pruning the smallest |w| of each matrix, 2:4 the two smallest of
every four consecutive weights along the input (the pattern NVIDIA's sparse tensor cores, and
PyTorch's semi-structured sparse tensors, take). Neither is smaller on disk as dense safetensors;
2:4 is what GPU kernels can turn into speed.

Structured pruning gives a genuinely smaller model: fewer query heads in every KV group (the
groups stay whole, so grouped-query attention and the KV cache keep their shape) and fewer FFN
channels, the same count in every layer (a Hugging Face config has one head count and one
intermediate size). What goes is chosen per layer by importance measured on calibration text:
a query head's share of the attention output, mean ‖x_h‖ · ‖W_o[:, h]‖ over the tokens, where x_h
is the head's slice of the output projection's input; an FFN channel's mean |x_j| · ‖W_down[:, j]‖,
x_j being the down projection's input. These are the first-order output magnitudes that
activation-aware methods such as Wanda rank weights by, taken per head and per channel.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

METHODS = ("magnitude", "2:4", "structured")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PruneOptions:
    method: str  # magnitude | 2:4 | structured
    sparsity: float = 0.5  # magnitude: share of weights zeroed; structured: share of heads and channels removed


def check(opts: PruneOptions) -> None:
    """Refuse options that cannot work, before any weights are loaded."""
    if opts.method not in METHODS:
        raise ValueError(f"unknown pruning method {opts.method!r}; one of {', '.join(METHODS)}")
    if not 0.0 <= opts.sparsity < 1.0:
        raise ValueError(f"sparsity {opts.sparsity} is outside [0, 1)")


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the weights kept: all but the round(sparsity · numel) smallest in magnitude."""
    drop = round(sparsity * w.numel())
    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if drop:
        keep[w.abs().flatten().argsort()[:drop]] = False
    return keep.view_as(w)


def semi_structured_mask(w: torch.Tensor) -> torch.Tensor:
    """True for the two largest in magnitude of every four consecutive weights of a row."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 pruning needs an input size divisible by 4, not {k}")
    groups = w.abs().reshape(n, k // 4, 4)
    top = groups.topk(2, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.view(n, k)


def _projections(model) -> list[torch.nn.Linear]:
    return [
        getattr(part, name)
        for layer in model.model.layers
        for part in (layer.self_attn, layer.mlp)
        for name in PROJECTIONS
        if hasattr(part, name)
    ]


@torch.no_grad()
def prune_weights(model, opts: PruneOptions) -> dict:
    """Magnitude or 2:4 pruning, in place; returns the record for engine.json."""
    zeros = total = 0
    for module in _projections(model):
        w = module.weight
        keep = semi_structured_mask(w) if opts.method == "2:4" else magnitude_mask(w, opts.sparsity)
        w.mul_(keep)
        zeros += int((w == 0).sum())
        total += w.numel()
    record = {"method": opts.method, "projection_sparsity": zeros / total}
    if opts.method == "magnitude":
        record["sparsity"] = opts.sparsity
    return record


# ---- structured -----------------------------------------------------------------------------------


@dataclass
class Importance:
    """Per layer: one score per query head, one per FFN channel."""

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]


@torch.no_grad()
def measure_importance(model, ids: list[int], chunk: int = 512) -> Importance:
    """Run the model over the calibration ids and score each query head and FFN channel."""
    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, _head_dim(cfg)
    layers = model.model.layers
    o_in = [torch.zeros(heads) for _ in layers]
    down_in = [torch.zeros(cfg.intermediate_size) for _ in layers]
    seen = [0]

    def on_o(i: int):
        def hook(_module, args):
            x = args[0].reshape(-1, heads, head_dim).float()
            o_in[i] += x.norm(dim=-1).sum(0).cpu()

        return hook

    def on_down(i: int):
        def hook(_module, args):
            down_in[i] += args[0].reshape(-1, args[0].shape[-1]).float().abs().sum(0).cpu()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
    device = next(model.parameters()).device
    try:
        for start in range(0, len(ids), chunk):
            piece = torch.tensor([ids[start : start + chunk]], device=device)
            model(piece, use_cache=False)
            seen[0] += piece.shape[1]
    finally:
        for h in handles:
            h.remove()
    n = max(1, seen[0])
    head_scores, channel_scores = [], []
    for i, layer in enumerate(layers):
        wo = layer.self_attn.o_proj.weight.float().cpu()  # [hidden, heads·head_dim]
        wo_norm = wo.reshape(wo.shape[0], heads, head_dim).norm(dim=(0, 2))
        head_scores.append(o_in[i] / n * wo_norm)
        wd = layer.mlp.down_proj.weight.float().cpu()  # [hidden, intermediate]
        channel_scores.append(down_in[i] / n * wd.norm(dim=0))
    return Importance(head_scores, channel_scores)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kept_heads(scores: torch.Tensor, kv_heads: int, keep_per_group: int) -> list[int]:
    """The query heads kept: the `keep_per_group` most important of every KV group, in order."""
    per_group = scores.numel() // kv_heads
    kept = []
    for g in range(kv_heads):
        group = scores[g * per_group : (g + 1) * per_group]
        best = group.topk(keep_per_group).indices.sort().values
        kept += [g * per_group + int(j) for j in best]
    return kept


def structured_counts(cfg, sparsity: float) -> tuple[int, int]:
    """Query heads per KV group and FFN channels kept: each the nearest whole count to (1 − sparsity)
    of the original, at least one head per group and a multiple of 16 channels (what the kernels tile)."""
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    per_group = cfg.num_attention_heads // kv
    heads = max(1, min(per_group, round(per_group * (1.0 - sparsity))))
    channels = max(16, 16 * round(cfg.intermediate_size * (1.0 - sparsity) / 16))
    return heads, min(channels, cfg.intermediate_size)


@torch.no_grad()
def prune_structured(model, opts: PruneOptions, ids: list[int], log: Callable[[str], None] = print):
    """A smaller model of the same architecture: the least important query heads of every KV group
    and FFN channels of every layer removed. Returns (model, record)."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"structured pruning knows Llama-style layers; {cfg.model_type} is not one")
    head_dim = _head_dim(cfg)
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    keep_per_group, keep_channels = structured_counts(cfg, opts.sparsity)
    log(f"structured pruning: measuring importance over {len(ids)} calibration tokens")
    importance = measure_importance(model, ids)
    state = model.state_dict()
    for i in range(cfg.num_hidden_layers):
        heads = kept_heads(importance.heads[i], kv, keep_per_group)
        rows = torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)])
        channels = importance.channels[i].topk(keep_channels).indices.sort().values
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = state[p + "self_attn.q_proj.weight"][rows]
        if p + "self_attn.q_proj.bias" in state:
            state[p + "self_attn.q_proj.bias"] = state[p + "self_attn.q_proj.bias"][rows]
        state[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, rows]
        for name in ("gate_proj", "up_proj"):
            state[p + f"mlp.{name}.weight"] = state[p + f"mlp.{name}.weight"][channels]
        state[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, channels]
    small_cfg = copy.deepcopy(cfg)
    small_cfg.num_attention_heads = keep_per_group * kv
    small_cfg.num_key_value_heads = kv
    small_cfg.head_dim = head_dim
    small_cfg.intermediate_size = keep_channels
    dtype = next(model.parameters()).dtype
    small = AutoModelForCausalLM.from_config(small_cfg, dtype=dtype)
    small.load_state_dict(state)
    small.generation_config = model.generation_config
    small.eval()
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    record = {
        "method": "structured",
        "sparsity": opts.sparsity,
        "query_heads": [cfg.num_attention_heads, small_cfg.num_attention_heads],
        "intermediate_size": [cfg.intermediate_size, keep_channels],
        "parameters": [before, after],
    }
    log(
        f"structured pruning: query heads {cfg.num_attention_heads} -> {small_cfg.num_attention_heads}, "
        f"FFN channels {cfg.intermediate_size} -> {keep_channels}, parameters {before / 1e6:.1f}M -> {after / 1e6:.1f}M"
    )
    return small, record
