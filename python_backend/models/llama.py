"""A lean Llama-family model (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2, TinyLlama) over a flat
batch of tokens and the paged KV cache.

The projections are fused (Q, K and V as one matrix; gate and up as one) so a layer is four matrix
products. Numerics follow transformers' definitions (RMSNorm in float32, rotary tables computed in
float32), which is what lets greedy output match it token for token.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from python_backend.models import quantized
from python_backend.models.quantized import QuantizedWeight
from python_backend.models.sparse import SparseWeight, sparsify
from python_backend.ops.attention import AttentionMetadata, paged_attention

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        arch = (cfg.get("architectures") or [None])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "MistralForCausalLM") else None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=window,
        )


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the attention scaling factor, for the rope types we support."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"rope type {kind!r} is not supported (default, linear, llama3 are)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


Weight = torch.Tensor | QuantizedWeight | SparseWeight
_OWN_PRODUCT = (QuantizedWeight, SparseWeight)  # weights that run their own matrix product


def _linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, _OWN_PRODUCT):
        return w.linear(x, b)
    return F.linear(x, w, b)


def _packed_linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, _OWN_PRODUCT):
        return w.linear(x, b)
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's prepacked bf16/fp16 weights: about 25% faster small-batch matrix products on CPUs with
    AMX or AVX-512 (a small model's shapes at 32 rows), and bit-identical to F.linear."""
    if not (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    ):
        return False
    # without those instructions (an AVX2-only CPU) oneDNN refuses to pack: plain F.linear there
    probe = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    return bool(getattr(torch.ops.mkldnn, probe, lambda: False)())


def kernels_available(device: torch.device, cfg: ModelConfig) -> bool:
    """The Triton kernels run on CUDA devices, for power-of-two head sizes. (Sliding windows need nothing:
    the engine caps the context at the window.)"""
    on_cpu = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FASTSERVE_KERNELS_ON_CPU") == "1"
    if device.type != "cuda" and not on_cpu:  # Triton's interpreter runs them on a CPU, slowly: tests only
        return False
    try:
        from python_backend.ops import triton_attention
    except ImportError:
        return False
    return triton_attention.supported(cfg.head_dim)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class Layer:
    qkv_w: Weight
    qkv_b: torch.Tensor | None
    o_w: Weight
    gate_up_w: Weight
    down_w: Weight
    ln1: torch.Tensor
    ln2: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


class LlamaModel:
    """Weights and the forward pass. Not an nn.Module: nothing here trains, and plain tensors keep
    the step free of module dispatch."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
        kernels: bool = False,
        quantization: str | None = None,
        sparse_min_rows: int | None = None,
    ):
        """`quantization`: the method the projections' weights are stored in (models/quantized.py),
        None for dense weights. `sparse_min_rows`: the projections are 2:4 sparse and run on the
        semi-structured sparse kernels in steps of at least this many rows (models/sparse.py); None
        for dense products."""
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.kernels = kernels and kernels_available(device, cfg)
        self.quantization = quantization

        def w(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(f"weight {name} is missing")
            return weights[name].to(device=device, dtype=dtype)

        def opt(name: str) -> torch.Tensor | None:
            return w(name) if name in weights else None

        def proj(names: list[str], n: list[int], k: int) -> Weight:
            """One projection (or several fused along N): dense, or quantized where stored so."""
            if quantization is None or f"{names[0]}.qweight" not in weights and f"{names[0]}.weight" in weights:
                return torch.cat([w(f"{name}.weight") for name in names]) if len(names) > 1 else w(f"{names[0]}.weight")
            parts = [
                quantized.load_weight(weights, name, quantization, rows, k, device) for name, rows in zip(names, n)
            ]
            return quantized.concat(parts) if len(parts) > 1 else parts[0]

        hd, hidden, inter = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        if "lm_head.qweight" in weights:
            self.lm_head = proj(["lm_head"], [cfg.vocab_size], hidden)
        elif cfg.tie_word_embeddings or "lm_head.weight" not in weights:
            self.lm_head = self.embed
        else:
            self.lm_head = w("lm_head.weight")
        self.layers: list[Layer] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            biases = [opt(a + f"{n}_proj.bias") for n in "qkv"]
            qkv_rows = [cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd]
            self.layers.append(
                Layer(
                    qkv_w=proj([a + f"{n}_proj" for n in "qkv"], qkv_rows, hidden),
                    qkv_b=torch.cat(biases) if all(b is not None for b in biases) else None,
                    o_w=proj([a + "o_proj"], [hidden], cfg.num_heads * hd),
                    gate_up_w=proj([p + "mlp.gate_proj", p + "mlp.up_proj"], [inter, inter], hidden),
                    down_w=proj([p + "mlp.down_proj"], [hidden], inter),
                    ln1=w(p + "input_layernorm.weight"),
                    ln2=w(p + "post_attention_layernorm.weight"),
                    q_norm=opt(a + "q_norm.weight"),
                    k_norm=opt(a + "k_norm.weight"),
                )
            )
        inv_freq, attn_scaling = rope_inv_freq(cfg)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * attn_scaling).to(device=device, dtype=dtype)
        self.sin = (emb.sin() * attn_scaling).to(device=device, dtype=dtype)
        self.scale = cfg.head_dim**-0.5
        self._linear = _linear
        if sparse_min_rows is not None:
            for layer in self.layers:
                for name in ("qkv_w", "o_w", "gate_up_w", "down_w"):
                    setattr(layer, name, sparsify(getattr(layer, name), sparse_min_rows))
        if _can_pack(device, dtype):
            self._pack_weights()
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # tensor parallelism (models/sharding.py): sums a row-parallel product's partials over the ranks,
        # and joins the ranks' vocabulary slices of the logits; None on a single device
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.gather_vocab: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.gemv: dict[tuple[str, int], object] = {}  # (projection, rows) -> GemvConfig; absent: cuBLAS
        self.fused_qkv: dict[int, object] = {}  # decode rows -> GemvConfig of fused_qkv; absent: three kernels

    def _pack_weights(self) -> None:
        def pack(w: Weight) -> Weight:
            if isinstance(w, QuantizedWeight):
                return w
            return torch.ops.mkldnn._reorder_linear_weight(w, None)

        for layer in self.layers:
            layer.qkv_w, layer.o_w = pack(layer.qkv_w), pack(layer.o_w)
            layer.gate_up_w, layer.down_w = pack(layer.gate_up_w), pack(layer.down_w)
        self.lm_head = pack(self.lm_head)  # a copy when tied: the embedding lookup needs the plain layout
        self._linear = _packed_linear

    def tune_decode_gemv(self) -> dict[str, dict[str, float]]:
        """Choose, per projection and decode batch of 1, 2 or 4 rows, between cuBLAS and the GEMV
        kernel's configurations by timing both on this device with this model's own weights (CUDA
        graphs over all layers, as a decode step runs them). Returns the timings."""
        from python_backend.ops import gemv

        groups = {
            "qkv": ([la.qkv_w for la in self.layers], False),
            "o": ([la.o_w for la in self.layers], False),
            "gate_up": ([la.gate_up_w for la in self.layers], False),
            "down": ([la.down_w for la in self.layers], True),
            "lm_head": ([self.lm_head], False),
        }
        timings = {}
        for name, (weights, silu_mul) in groups.items():
            if isinstance(weights[0], SparseWeight):
                continue  # the sparse kernels, or below their rows the dense weight through cuBLAS
            quantized = [w for w in weights if isinstance(w, QuantizedWeight)]
            if quantized:  # layers kept dense beside them (--dense-layers) stay with cuBLAS
                from python_backend.ops import quant_gemv  # our GEMV, or the dense path, by timing

                for rows in quant_gemv.TUNED_ROWS:
                    config, timings[f"{name}/{rows}"] = quant_gemv.choose(quantized, rows, self.dtype)
                    for w in quantized:
                        w.gemv[rows] = config
                for w in quantized:
                    w.drop_unused_layouts()
                continue
            for rows in (1, 2, 4):
                config, timings[f"{name}/{rows}"] = gemv.choose(weights, rows, silu_mul)
                if config is not None:
                    self.gemv[(name, rows)] = config
        if self.layers[0].q_norm is None and all(isinstance(la.qkv_w, torch.Tensor) for la in self.layers):
            for rows in (1, 2, 4):
                timings[f"add_norm_qkv_rope/{rows}"] = self._tune_fused_qkv(rows)
        return timings

    def _tune_fused_qkv(self, rows: int) -> dict[str, float]:
        """Time fused_qkv's candidates against the three kernels it replaces (add + RMSNorm, the QKV
        projection as chosen above, rotary + KV write) over all layers, and keep the fastest where it
        wins by gemv's margin."""
        from python_backend.ops import fused, gemv
        from python_backend.ops import triton_attention as ta
        from python_backend.ops.fused_qkv import add_norm_qkv_rope

        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        k_cache = torch.zeros(1, 16, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype, device=self.device)
        v_cache = torch.zeros_like(k_cache)
        out = torch.randn(rows, cfg.hidden_size, dtype=self.dtype, device=self.device)
        residual = torch.randn_like(out)
        positions = torch.arange(rows, device=self.device)
        slots = torch.arange(rows, device=self.device)
        heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

        def three() -> None:
            for la in self.layers:
                x, _ = fused.add_rms_norm(out, residual, la.ln1, eps)
                qkv = self._proj("qkv", x, la.qkv_w, la.qkv_b)
                ta.rope_write_kv(qkv, positions, self.cos, self.sin, slots, k_cache, v_cache, *heads)

        def one(config) -> None:
            for la in self.layers:
                add_norm_qkv_rope(
                    out,
                    residual,
                    la.ln1,
                    eps,
                    la.qkv_w,
                    la.qkv_b,
                    positions,
                    self.cos,
                    self.sin,
                    slots,
                    k_cache,
                    v_cache,
                    *heads,
                    config=config,
                )

        times = {"three_kernels": gemv.graph_time(three) / len(self.layers)}
        for config in gemv.CANDIDATES:
            times[gemv.name(config)] = gemv.graph_time(lambda c=config: one(c)) / len(self.layers)
        best = min(gemv.CANDIDATES, key=lambda c: times[gemv.name(c)])
        if times[gemv.name(best)] < gemv.MARGIN * times["three_kernels"]:
            self.fused_qkv[rows] = best
        return times

    def _proj(
        self,
        name: str,
        x: torch.Tensor,
        weight: Weight,
        bias: torch.Tensor | None = None,
        silu_mul: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One projection of the kernel path: the GEMV kernel where tune_decode_gemv chose it for
        this many rows, cuBLAS otherwise (with silu_mul, x is the gate-up output); a quantized weight
        runs its own product, as a sparse one does. `out` takes the result (float32 for logits), as
        gemv's does."""
        if isinstance(weight, _OWN_PRODUCT):
            if silu_mul:
                from python_backend.ops import fused

                x = fused.silu_mul(x)
            y = weight.linear(x, bias)
            return y if out is None else out.copy_(y)
        rows = x.shape[0]
        config = self.gemv.get((name, 1 << max(0, (rows - 1).bit_length()))) if 0 < rows <= 4 else None
        if config is not None:
            from python_backend.ops.gemv import gemv

            return gemv(x, weight, bias, silu_mul=silu_mul, config=config, out=out)
        if silu_mul:
            from python_backend.ops import fused

            x = fused.silu_mul(x)
        y = F.linear(x, weight, bias)
        return y if out is None else out.copy_(y)

    @classmethod
    def load(
        cls,
        folder: Path,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
        kernels: bool = False,
        quantization: str | None = None,
        sparse_min_rows: int | None = None,
    ) -> LlamaModel:
        import json

        from safetensors.torch import load_file

        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
        weights: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(str(f)))
        return cls(cfg, weights, dtype, device, max_len, kernels, quantization, sparse_min_rows)

    def _weights(self) -> list:
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            tensors += [t for t in vars(layer).values() if t is not None]
        return tensors

    @property
    def num_bytes(self) -> int:
        """The weights in memory, every kernel's layout of them included."""
        return sum(
            t.num_bytes if isinstance(t, _OWN_PRODUCT) else t.numel() * t.element_size() for t in self._weights()
        )

    @property
    def read_bytes(self) -> int:
        """The weights as a single-sequence decode step reads them: each once, in one layout."""
        return sum(
            t.read_bytes if isinstance(t, _OWN_PRODUCT) else t.numel() * t.element_size() for t in self._weights()
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        logit_rows: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> float32 logits [len(logit_rows), vocab] for the rows asked for
        (every row where logit_rows is None, as in a decode step), in `out` where given."""
        if self.kernels:
            return self._forward_kernels(input_ids, positions, meta, k_cache, v_cache, logit_rows, out)
        h = F.embedding(input_ids, self.embed)
        cos = self.cos.index_select(0, positions)[:, None, :]
        sin = self.sin.index_select(0, positions)[:, None, :]
        eps = self.cfg.rms_norm_eps
        for i, layer in enumerate(self.layers):
            q, k, v = self._pre_attention(
                h, layer.ln1, layer.qkv_w, layer.qkv_b, layer.q_norm, layer.k_norm, cos, sin, eps
            )
            attn = paged_attention(q, k, v, k_cache[i], v_cache[i], meta, self.scale)
            h = self._post_attention(h, attn, layer.o_w, layer.ln2, layer.gate_up_w, layer.down_w, eps)
        h = rms_norm(h if logit_rows is None else h.index_select(0, logit_rows), self.norm, eps)
        logits = self._linear(h, self.lm_head)
        if self.gather_vocab is not None:
            logits = self.gather_vocab(logits)
        return logits.float() if out is None else out.copy_(logits)

    def _forward_kernels(self, input_ids, positions, meta: AttentionMetadata, k_cache, v_cache, logit_rows, logits):
        """The same model with the Triton kernels: residual add fused into each RMSNorm, rotary and the
        KV write in one launch per layer, paged attention kernels, SiLU-and-multiply fused; in small
        decode steps the add, norm, QKV product, rotary and KV write in one launch (fused_qkv)."""
        from python_backend.ops import fused
        from python_backend.ops import triton_attention as ta

        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        t = input_ids.shape[0]
        nd = meta.num_decode
        # a decode step of up to 4 rows: add + norm, QKV, rotary and KV write in one launch where tuned
        # (into a cache of plain values; codes are written by rope_write_kv)
        fusable = 0 < t == nd <= 4 and ta.kv_codes(k_cache[0]) == ta.PLAIN
        one = self.fused_qkv.get(1 << max(0, (t - 1).bit_length())) if fusable else None
        residual = F.embedding(input_ids, self.embed)
        x = None if one else fused.rms_norm(residual, self.layers[0].ln1, eps)
        out = None
        for i, layer in enumerate(self.layers):
            if one:
                from python_backend.ops.fused_qkv import add_norm_qkv_rope

                q, residual = add_norm_qkv_rope(
                    out,
                    residual,
                    layer.ln1,
                    eps,
                    layer.qkv_w,
                    layer.qkv_b,
                    positions,
                    self.cos,
                    self.sin,
                    meta.slot_mapping,
                    k_cache[i],
                    v_cache[i],
                    cfg.num_heads,
                    cfg.num_kv_heads,
                    cfg.head_dim,
                    config=one,
                )
            else:
                qkv = self._proj("qkv", x, layer.qkv_w, layer.qkv_b)
                if layer.q_norm is not None:
                    nq = cfg.num_heads + cfg.num_kv_heads
                    qk = qkv[:, : self.q_size + self.kv_size].view(t, nq, cfg.head_dim)
                    qk[:, : cfg.num_heads] = rms_norm(qk[:, : cfg.num_heads], layer.q_norm, eps)
                    qk[:, cfg.num_heads :] = rms_norm(qk[:, cfg.num_heads :], layer.k_norm, eps)
                q = ta.rope_write_kv(
                    qkv,
                    positions,
                    self.cos,
                    self.sin,
                    meta.slot_mapping,
                    k_cache[i],
                    v_cache[i],
                    cfg.num_heads,
                    cfg.num_kv_heads,
                    cfg.head_dim,
                )
            attn = torch.empty_like(q)
            if nd:
                ta.decode_attention(
                    q[:nd],
                    k_cache[i],
                    v_cache[i],
                    meta.decode_block_tables,
                    meta.decode_seq_lens,
                    self.scale,
                    meta.num_splits,
                    out=attn[:nd],
                )
            if t > nd:
                ta.prefill_attention(
                    q[nd:],
                    k_cache[i],
                    v_cache[i],
                    meta.prefill_block_tables,
                    meta.prefill_cu_q,
                    meta.prefill_context_lens,
                    meta.prefill_max_q,
                    self.scale,
                    out=attn[nd:],
                )
            o = self._proj("o", attn.view(t, self.q_size), layer.o_w)
            x, residual = fused.add_rms_norm(o, residual, layer.ln2, eps)
            out = self._proj("down", self._proj("gate_up", x, layer.gate_up_w), layer.down_w, silu_mul=True)
            if i + 1 < len(self.layers) and not one:
                x, residual = fused.add_rms_norm(out, residual, self.layers[i + 1].ln1, eps)
        if logit_rows is not None:
            out, residual = out.index_select(0, logit_rows), residual.index_select(0, logit_rows)
        x, _ = fused.add_rms_norm(out, residual, self.norm, eps)
        if logits is None:
            logits = torch.empty(x.shape[0], cfg.vocab_size, dtype=torch.float32, device=x.device)
        return self._proj("lm_head", x, self.lm_head, out=logits)

    def _pre_attention(self, h, ln1, qkv_w, qkv_b, q_norm, k_norm, cos, sin, eps: float):
        """Norm, fused QKV projection, optional q/k norms, and one rotary pass over q and k together."""
        cfg = self.cfg
        t = h.shape[0]
        qkv = self._linear(rms_norm(h, ln1, eps), qkv_w, qkv_b)
        nq = cfg.num_heads + cfg.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(t, nq, cfg.head_dim)
        if q_norm is not None:
            qk = torch.cat(
                [rms_norm(qk[:, : cfg.num_heads], q_norm, eps), rms_norm(qk[:, cfg.num_heads :], k_norm, eps)], 1
            )
        qk = qk * cos + _rotate_half(qk) * sin
        v = qkv[:, self.q_size + self.kv_size :].reshape(t, cfg.num_kv_heads, cfg.head_dim)
        return qk[:, : cfg.num_heads], qk[:, cfg.num_heads :].contiguous(), v

    def _post_attention(self, h, attn, o_w, ln2, gate_up_w, down_w, eps: float):
        """Output projection and residual, then norm, SiLU-gated MLP and residual."""
        o = self._linear(attn.reshape(h.shape[0], self.q_size), o_w)
        h = h + (o if self.all_reduce is None else self.all_reduce(o))
        gate, up = self._linear(rms_norm(h, ln2, eps), gate_up_w).chunk(2, dim=-1)
        down = self._linear(F.silu(gate) * up, down_w)
        return h + (down if self.all_reduce is None else self.all_reduce(down))
