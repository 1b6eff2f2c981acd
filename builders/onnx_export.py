"""The model's decoder as an ONNX graph, with its KV cache as inputs and outputs.

One graph serves prefill and decode alike:

    inputs   input_ids [batch, seq] int64, position_ids [batch, seq] int64,
             attention_mask [batch, past + seq] int64 (1: a real token, 0: padding in the past),
             logit_positions [batch, rows] int64 (which of the seq positions get logits),
             past_key.{i}, past_value.{i} [batch, kv_heads, past, head_dim] for every layer i
    outputs  logits [batch, rows, vocab] float32,
             present_key.{i}, present_value.{i} [batch, kv_heads, past + seq, head_dim]

The weights are the engine folder's own (so a pruned or distilled build exports what it serves):
dense ones in float32, int8 and int4 codes as ONNX Runtime's MatMulNBits (builders/onnx_nbits.py).
Attention is written with plain operators (MatMul, Softmax, a causal-and-padding mask) so any ONNX
runtime or TensorRT parser takes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from builders import onnx_nbits, onnx_rotary
from python_backend.engine.graph_runner import GraphNames
from python_backend.models.llama import ModelConfig, rope_inv_freq

OPSET = 18
ONNX_FILE = "model.onnx"


class OnnxExportError(RuntimeError):
    pass


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Written as x / sqrt(mean(x^2) + eps) * weight: the pattern ONNX Runtime fuses into one
    SimplifiedLayerNormalization."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Dense(torch.nn.Module):
    """A float32 projection (and bias)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # a parameter passed in is kept as it is, so a tied output projection stays one tensor
        self.weight = (
            weight
            if isinstance(weight, torch.nn.Parameter)
            else torch.nn.Parameter(weight.float(), requires_grad=False)
        )
        self.bias = None if bias is None else torch.nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def projection(
    weights: dict[str, torch.Tensor],
    names: list[str],
    biases: list[torch.Tensor] | None,
    accuracy_level: int,
    block_sums: dict[tuple[int, int], torch.Tensor],
) -> torch.nn.Module:
    """The projections `names` (which read one input) as one product, their outputs side by side:
    dense float32, or the folder's quantized codes run by MatMulNBits."""
    bias = torch.cat(biases) if biases else None
    if all(f"{n}.weight" in weights for n in names):
        return Dense(torch.cat([weights[f"{n}.weight"].float() for n in names]), bias)
    parts = []
    for name in names:
        qweight = weights.get(f"{name}.qweight")
        if qweight is None:
            raise OnnxExportError(f"weight {name} is missing (or dense where {names[0]} is quantized)")
        if qweight.dtype == torch.int8:
            parts.append(onnx_nbits.from_int8(qweight, weights[f"{name}.scale"]))
        elif qweight.dtype == torch.uint8 and f"{name}.offset" in weights:
            parts.append(onnx_nbits.from_int4(qweight, weights[f"{name}.scale"], weights[f"{name}.offset"]))
        else:
            raise OnnxExportError(f"{name}: {qweight.dtype} codes have no ONNX Runtime CPU operator")
    try:
        packed = onnx_nbits.concatenate(parts)
    except onnx_nbits.NBitsError as e:
        raise OnnxExportError(f"{', '.join(names)}: {e}") from e
    key = (packed.k, packed.block_size)
    if key not in block_sums:
        block_sums[key] = onnx_nbits.block_sum_matrix(*key)
    return onnx_nbits.NBitsLinear(packed, bias, accuracy_level, block_sums[key])


class Decoder(torch.nn.Module):
    """The Llama-family decoder over a contiguous KV cache, in the graph's calling convention. Built
    from an engine folder's weights; also the PyTorch reference the export is checked against."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        max_len: int,
        accuracy_level: int = onnx_nbits.SERVED_ACCURACY_LEVEL,
        contrib_rotary: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        self.contrib_rotary = contrib_rotary

        def w(name: str) -> torch.nn.Parameter:
            if name not in weights:
                raise OnnxExportError(f"weight {name} is missing")
            return torch.nn.Parameter(weights[name].float(), requires_grad=False)

        def opt(name: str) -> torch.nn.Parameter | None:
            return w(name) if name in weights else None

        block_sums: dict[tuple[int, int], torch.Tensor] = {}

        def proj(*names: str, biases: list[torch.Tensor] | None = None) -> torch.nn.Module:
            return projection(weights, list(names), biases, accuracy_level, block_sums)

        # the same weights, and the same rules for which are used, as the engine's LlamaModel: Q, K
        # and V biases (Qwen2), q/k norms (Qwen3), an output projection tied to the embedding unless
        # the model has its own (a quantized build stores its own codes of the tied weight)
        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        own_head = not cfg.tie_word_embeddings and "lm_head.weight" in weights
        self.lm_head = proj("lm_head") if own_head or "lm_head.qweight" in weights else Dense(self.embed, None)
        self.layers = torch.nn.ModuleList()
        for i in range(cfg.num_layers):
            p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
            layer = torch.nn.Module()
            biases = [weights.get(a + f"{n}_proj.bias") for n in "qkv"]
            has_bias = all(b is not None for b in biases)
            layer.qkv = proj(a + "q_proj", a + "k_proj", a + "v_proj", biases=biases if has_bias else None)
            layer.o = proj(a + "o_proj")
            layer.gate_up = proj(p + "mlp.gate_proj", p + "mlp.up_proj")
            layer.down = proj(p + "mlp.down_proj")
            layer.ln1, layer.ln2 = w(p + "input_layernorm.weight"), w(p + "post_attention_layernorm.weight")
            layer.q_norm, layer.k_norm = opt(a + "q_norm.weight"), opt(a + "k_norm.weight")
            self.layers.append(layer)
        self.quantized = any(isinstance(m, onnx_nbits.NBitsLinear) for m in self.modules())
        inv_freq, scaling = rope_inv_freq(cfg)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)
        self.register_buffer("cos_half", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin_half", freqs.sin() * scaling, persistent=False)

    @classmethod
    def from_engine_folder(
        cls,
        folder: Path,
        max_len: int | None = None,
        accuracy_level: int = onnx_nbits.SERVED_ACCURACY_LEVEL,
        contrib_rotary: bool = False,
    ) -> Decoder:
        """`contrib_rotary`: rotate Q and K with ONNX Runtime's RotaryEmbedding (a graph for ONNX
        Runtime only)."""
        from safetensors.torch import load_file

        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        meta = json.loads((folder / "engine.json").read_text())
        method = (meta.get("quantization") or {}).get("method")
        if method not in (None, "int8", "int4"):
            raise OnnxExportError(
                f"{folder}: {method} weights have no ONNX Runtime CPU operator; the ONNX export takes dense, "
                "int8 and int4 weights"
            )
        weights: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        max_len = max_len or meta.get("max_model_len") or cfg.max_position_embeddings
        return cls(cfg, weights, max_len, accuracy_level, contrib_rotary)

    def forward(self, input_ids, position_ids, attention_mask, logit_positions, *past):
        cfg = self.cfg
        b, s = input_ids.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        group = nh // nkv
        h = F.embedding(input_ids, self.embed)
        if not self.contrib_rotary:
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
            q, k, v = la.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            if la.q_norm is not None:
                q = _rms_norm(q.reshape(b, s, nh, hd), la.q_norm, eps).reshape(b, s, nh * hd)
                k = _rms_norm(k.reshape(b, s, nkv, hd), la.k_norm, eps).reshape(b, s, nkv * hd)
            if self.contrib_rotary:
                q = onnx_rotary.rotary(q, position_ids, self.cos_half, self.sin_half, nh)
                k = onnx_rotary.rotary(k, position_ids, self.cos_half, self.sin_half, nkv)
            q, k = q.reshape(b, s, nh, hd).transpose(1, 2), k.reshape(b, s, nkv, hd).transpose(1, 2)
            v = v.reshape(b, s, nkv, hd).transpose(1, 2)  # [b, heads, s, hd]
            if not self.contrib_rotary:
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            qg = q.reshape(b, nkv, group * s, hd)  # the query heads of one KV head side by side
            scores = torch.matmul(qg, k.transpose(2, 3)).view(b, nkv, group, s, total) * (hd**-0.5)
            probs = torch.softmax(scores + bias.unsqueeze(1), dim=-1)
            attn = torch.matmul(probs.view(b, nkv, group * s, total), v).view(b, nh, s, hd)
            h = h + la.o(attn.transpose(1, 2).reshape(b, s, nh * hd))
            x = _rms_norm(h, la.ln2, eps)
            gate, up = la.gate_up(x).split([cfg.intermediate_size] * 2, dim=-1)
            h = h + la.down(F.silu(gate) * up)
        rows = torch.gather(h, 1, logit_positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        logits = self.lm_head(_rms_norm(rows, self.norm, eps))
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
            custom_translation_table=onnx_nbits.translation_table() | onnx_rotary.translation_table(),
            dynamo=True,
            external_data=True,
            optimize=True,
            verbose=False,
        )
    program.save(str(out), external_data=True)
    return out


def with_accuracy_level(path: Path, out: Path, level: int) -> Path:
    """A copy of the graph at `path` whose MatMulNBits nodes run at `level`, written beside it and
    reading the same external weights file."""
    import onnx

    if out.parent != path.parent:
        raise ValueError("the copy must sit beside the graph to share its weights file")
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
    onnx.save(model, str(out))
    return out
