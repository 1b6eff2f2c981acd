"""The model's decoder as an ONNX graph, with its KV cache as inputs and outputs.

One graph serves prefill and decode alike:

    inputs   input_ids [batch, seq] int64, position_ids [batch, seq] int64,
             attention_mask [batch, past + seq] int64 (1: a real token, 0: padding in the past),
             logit_positions [batch, rows] int64 (which of the seq positions get logits),
             past_key.{i}, past_value.{i} [batch, kv_heads, past, head_dim] for every layer i
    outputs  logits [batch, rows, vocab] float32,
             present_key.{i}, present_value.{i} [batch, kv_heads, past + seq, head_dim]

The weights are the engine folder's own (read with the engine's loader, so a pruned or distilled
build exports what it serves), in float32. Attention is written with plain operators (MatMul, Softmax,
a causal-and-padding mask) so any ONNX runtime or TensorRT parser takes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from python_backend.engine.graph_runner import GraphNames
from python_backend.models.llama import ModelConfig, rope_inv_freq

OPSET = 18
ONNX_FILE = "model.onnx"


class OnnxExportError(RuntimeError):
    pass


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoder(torch.nn.Module):
    """The Llama-family decoder over a contiguous KV cache, in the graph's calling convention. Built
    from an engine folder's weights; also the PyTorch reference the export is checked against."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], max_len: int):
        super().__init__()
        self.cfg = cfg

        def w(name: str) -> torch.nn.Parameter:
            if name not in weights:
                raise OnnxExportError(f"weight {name} is missing")
            return torch.nn.Parameter(weights[name].float(), requires_grad=False)

        def opt(name: str) -> torch.nn.Parameter | None:
            return w(name) if name in weights else None

        # the same weights, and the same rules for which are used, as the engine's LlamaModel: Q, K
        # and V biases (Qwen2), q/k norms (Qwen3), an output projection tied to the embedding unless
        # the model has its own
        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        untied = not cfg.tie_word_embeddings and "lm_head.weight" in weights
        self.lm_head = w("lm_head.weight") if untied else self.embed
        self.layers = torch.nn.ModuleList()
        for i in range(cfg.num_layers):
            p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
            layer = torch.nn.Module()
            for short, name in (
                ("q", a + "q_proj"),
                ("k", a + "k_proj"),
                ("v", a + "v_proj"),
                ("o", a + "o_proj"),
                ("gate", p + "mlp.gate_proj"),
                ("up", p + "mlp.up_proj"),
                ("down", p + "mlp.down_proj"),
            ):
                setattr(layer, short + "_w", w(name + ".weight"))
            biases = [opt(a + f"{n}_proj.bias") for n in "qkv"]
            has_bias = all(b is not None for b in biases)
            layer.q_b, layer.k_b, layer.v_b = biases if has_bias else (None, None, None)
            layer.ln1, layer.ln2 = w(p + "input_layernorm.weight"), w(p + "post_attention_layernorm.weight")
            layer.q_norm, layer.k_norm = opt(a + "q_norm.weight"), opt(a + "k_norm.weight")
            self.layers.append(layer)
        inv_freq, scaling = rope_inv_freq(cfg)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    @classmethod
    def from_engine_folder(cls, folder: Path, max_len: int | None = None) -> Decoder:
        from safetensors.torch import load_file

        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        meta = json.loads((folder / "engine.json").read_text())
        if meta.get("quantization"):
            raise OnnxExportError(
                f"{folder}: the weights are quantized ({meta['quantization'].get('method')}); the ONNX export "
                "takes dense weights"
            )
        weights: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        return cls(cfg, weights, max_len or meta.get("max_model_len") or cfg.max_position_embeddings)

    def forward(self, input_ids, position_ids, attention_mask, logit_positions, *past):
        cfg = self.cfg
        b, s = input_ids.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        group = nh // nkv
        h = F.embedding(input_ids, self.embed)
        cos = self.cos[position_ids].unsqueeze(1)  # [b, 1, s, hd]
        sin = self.sin[position_ids].unsqueeze(1)
        total = attention_mask.shape[1]
        past_len = total - s
        key_pos = torch.arange(total, device=input_ids.device)
        query_pos = torch.arange(s, device=input_ids.device) + past_len
        causal = key_pos[None, :] <= query_pos[:, None]  # [s, total]
        visible = causal[None, None] & (attention_mask[:, None, None, :] > 0)  # [b, 1, s, total]
        bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill(~visible, float("-inf"))
        eps = cfg.rms_norm_eps
        presents = []
        for i, la in enumerate(self.layers):
            x = _rms_norm(h, la.ln1, eps)
            q = F.linear(x, la.q_w, la.q_b).view(b, s, nh, hd)
            k = F.linear(x, la.k_w, la.k_b).view(b, s, nkv, hd)
            v = F.linear(x, la.v_w, la.v_b).view(b, s, nkv, hd).transpose(1, 2)
            if la.q_norm is not None:
                q, k = _rms_norm(q, la.q_norm, eps), _rms_norm(k, la.k_norm, eps)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, heads, s, hd]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            qg = q.reshape(b, nkv, group * s, hd)  # the query heads of one KV head side by side
            scores = torch.matmul(qg, k.transpose(2, 3)).view(b, nkv, group, s, total) * (hd**-0.5)
            probs = torch.softmax(scores + bias.unsqueeze(1), dim=-1)
            attn = torch.matmul(probs.view(b, nkv, group * s, total), v).view(b, nh, s, hd)
            h = h + F.linear(attn.transpose(1, 2).reshape(b, s, nh * hd), la.o_w)
            x = _rms_norm(h, la.ln2, eps)
            h = h + F.linear(F.silu(F.linear(x, la.gate_w)) * F.linear(x, la.up_w), la.down_w)
        rows = torch.gather(h, 1, logit_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        logits = F.linear(_rms_norm(rows, self.norm, eps), self.lm_head)
        return (logits, *presents)

    def empty_past(self, batch: int = 1) -> list[torch.Tensor]:
        cfg = self.cfg
        return [torch.zeros(batch, cfg.num_kv_heads, 0, cfg.head_dim) for _ in range(2 * cfg.num_layers)]


def example_inputs(decoder: Decoder, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    cfg = decoder.cfg
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    positions = torch.arange(past, past + seq).repeat(batch, 1)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    rows = torch.full((batch, 1), seq - 1, dtype=torch.long)
    kv = [torch.randn(batch, cfg.num_kv_heads, past, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    return (ids, positions, mask, rows, *kv)


def export(decoder: Decoder, out: Path) -> Path:
    """Write the graph to `out` (weights beside it in one external-data file). Returns its path."""
    names = GraphNames(decoder.cfg.num_layers)
    batch, seq, past, rows = (torch.export.Dim(n, min=1) for n in ("batch", "seq", "past", "rows"))
    dynamic = (
        {0: batch, 1: seq},
        {0: batch, 1: seq},
        {0: batch, 1: torch.export.Dim.AUTO},
        {0: batch, 1: rows},
        tuple({0: batch, 2: past} for _ in names.past),  # *past arrives as one tuple
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            decoder,
            example_inputs(decoder),
            dynamic_shapes=dynamic,
            input_names=names.inputs,
            output_names=names.outputs,
            opset_version=OPSET,
            dynamo=True,
            external_data=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(out), external_data=True)
    return out
