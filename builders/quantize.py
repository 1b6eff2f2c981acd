"""Weight quantization for the builder: int8, int4 with activation-aware scales (AWQ), FP8, and a
GGUF file's own 4-bit blocks taken as they are.

The result is a dict of tensors in the layout python_backend/models/quantized.py serves, plus a
record of what was done (method, group sizes, the calibration text's hash) for engine.json.

AWQ (Lin et al., 2023): a few input channels carry much larger activations than the rest, and the
weights that meet them matter most. Scaling those weight columns up by s before rounding (and the
activations down by 1/s, folded into the operation that produces them: the RMSNorm before Q/K/V
and gate/up, the up projection before down, V before the output projection) lets them round on a
finer grid. s = mean|x|^alpha per channel, with alpha chosen per layer from a grid by the output
error on calibration activations. We implement it here rather than through llm-compressor or
AutoAWQ: their output is a transformers checkpoint in their own format (and a large dependency
tree), while we need our fused layout and a record of the calibration text; the algorithm itself
is a page.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from python_backend.models.quantized import pack_int4

AWQ_GRID = 20  # alpha in 0, 0.05, ..., 0.95
SEARCH_TOKENS = 512  # calibration rows kept per layer input for the scale search
SENSITIVITY_TOKENS = 1024  # calibration tokens over which each layer's rounding is judged


@dataclass
class QuantizeOptions:
    method: str  # int8 | int4 | fp8
    group_size: int = 128
    symmetric: bool = False
    awq: bool = True
    lm_head: bool = True
    fp8_scales: str = "channel"  # channel | tensor
    dense_layers: int = 0  # decoder layers kept dense, the most sensitive first


# ---- rounding -----------------------------------------------------------------------------------


def group_size_for(k: int, wanted: int) -> int:
    """The group size used for an input size K: the one asked for where it divides K, else the largest
    power of two below it that does (SmolLM2's 576 takes 64 where 128 was asked)."""
    g = 1 << (wanted.bit_length() - 1)  # the kernels take powers of two
    while g > 1 and k % g:
        g //= 2
    if g < 16:
        raise ValueError(f"no group size of at least 16 divides the input size {k}")
    return g


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool) -> dict[str, torch.Tensor]:
    """w [N, K] -> codes 0..15 packed two per byte, with a float16 scale and offset per group."""
    n, k = w.shape
    g = group_size_for(k, group_size)
    wg = w.float().reshape(n, k // g, g)
    if symmetric:
        scale = wg.abs().amax(-1) / 7
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (torch.round(wg / scale[..., None]) + 8).clamp(0, 15)
        offset = -8 * scale
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
        offset = lo
    return {
        "qweight": pack_int4(codes.reshape(n, k).to(torch.uint8)),
        "scale": _half(scale),
        "offset": _half(offset),
    }


def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = w.float().abs().amax(1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": codes, "scale": scale}


def quantize_fp8(w: torch.Tensor, per_channel: bool) -> dict[str, torch.Tensor]:
    top = torch.finfo(torch.float8_e4m3fn).max
    amax = w.float().abs().amax(1) if per_channel else w.float().abs().amax().reshape(1)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    codes = (w.float() / scale.reshape(-1, 1)).clamp(-top, top).to(torch.float8_e4m3fn)
    return {"qweight": codes, "scale": scale}


def _half(t: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(t.half()).all():
        raise ValueError("a scale or offset does not fit in float16")
    return t.half()


def quantize_weight(w: torch.Tensor, opts: QuantizeOptions) -> dict[str, torch.Tensor]:
    if opts.method == "int4":
        return quantize_int4(w, opts.group_size, opts.symmetric)
    if opts.method == "int8":
        return quantize_int8(w)
    if opts.method == "fp8":
        return quantize_fp8(w, opts.fp8_scales == "channel")
    raise ValueError(f"unknown quantization method {opts.method!r}")


def fake_quantize(w: torch.Tensor, opts: QuantizeOptions) -> torch.Tensor:
    """w rounded as the method would store it, back in float32 (for the AWQ search)."""
    from python_backend.models.quantized import QuantizedWeight

    parts = quantize_weight(w, opts)
    return QuantizedWeight(opts.method, parts["qweight"], parts["scale"], parts.get("offset")).dequantize()


def fake_quantize_inputs(x: torch.Tensor, opts: QuantizeOptions) -> torch.Tensor:
    """x as the served product sees it: FP8 rounds each row to E4M3 with its own scale (the engine's
    `_linear_fp8`); the weight-only methods leave it as it is."""
    if opts.method != "fp8":
        return x
    top = torch.finfo(torch.float8_e4m3fn).max
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / top
    return (x / scale).clamp(-top, top).to(torch.float8_e4m3fn).to(x.dtype) * scale


# ---- which layers stay dense --------------------------------------------------------------------


@torch.no_grad()
def layer_sensitivity(model, ids: list[int], opts: QuantizeOptions, chunk: int = 512) -> list[float]:
    """Per decoder layer: the mean KL divergence of the model's next-token distributions, with only
    that layer's projections rounded as `opts` rounds them (weights, and inputs where the method
    rounds those), from the float model's. A few layers often carry most of a method's loss (in
    SmolLM2, FP8 in the last layer is half of it), and keeping those dense buys that quality back
    for a few percent of the weights. AWQ's scales are left out of this ranking."""
    chunks = [torch.tensor([ids[i : i + chunk]]) for i in range(0, len(ids), chunk)]
    reference = [torch.log_softmax(model(input_ids=c, use_cache=False).logits[0].float(), -1) for c in chunks]
    scores = []
    for layer in model.model.layers:
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        saved = [m.weight.detach().clone() for m in linears]
        hooks = [m.register_forward_pre_hook(lambda _m, args: (fake_quantize_inputs(args[0], opts),)) for m in linears]
        try:
            for m in linears:
                m.weight.copy_(fake_quantize(m.weight, opts).to(m.weight.dtype))
            kl, count = 0.0, 0
            for c, ref in zip(chunks, reference):
                logp = torch.log_softmax(model(input_ids=c, use_cache=False).logits[0].float(), -1)
                kl += (ref.exp() * (ref - logp)).sum().item()
                count += c.shape[1]
        finally:
            for h in hooks:
                h.remove()
            for m, w in zip(linears, saved):
                m.weight.copy_(w)
        scores.append(kl / count)
    return scores


# ---- calibration and AWQ ------------------------------------------------------------------------


@dataclass
class LayerInputs:
    """What the scale search needs of one linear input: mean |x| per channel, and some rows of x."""

    mean_abs: torch.Tensor
    rows: torch.Tensor


@torch.no_grad()
def collect_inputs(model, ids: list[int], chunk: int = 512) -> dict[str, LayerInputs]:
    """Run the float model over the calibration ids and record the inputs of each layer's
    projections (q_proj stands for q, k and v; gate_proj for gate and up), and of the LM head."""
    targets = {}
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        targets[p + "self_attn.q_proj"] = layer.self_attn.q_proj
        targets[p + "self_attn.o_proj"] = layer.self_attn.o_proj
        targets[p + "mlp.gate_proj"] = layer.mlp.gate_proj
        targets[p + "mlp.down_proj"] = layer.mlp.down_proj
    targets["lm_head"] = model.lm_head
    sums: dict[str, torch.Tensor] = {}
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    counts = {name: 0 for name in targets}
    n_chunks = max(1, -(-len(ids) // chunk))
    per_chunk = -(-SEARCH_TOKENS // n_chunks)
    hooks = []

    def hook(name: str):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            counts[name] += x.shape[0]
            step = max(1, x.shape[0] // per_chunk)
            kept[name].append(x[::step][:per_chunk].clone())

        return record

    for name, module in targets.items():
        hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        for start in range(0, len(ids), chunk):
            part = torch.tensor([ids[start : start + chunk]])
            model(input_ids=part, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: LayerInputs(sums[name] / counts[name], torch.cat(kept[name])) for name in targets}


def search_scales(x: LayerInputs, weights: list[torch.Tensor], opts: QuantizeOptions) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale s (and its alpha) that minimises the error of x @ Q(W * s)^T / s
    against x @ W^T, summed over the weights that share this input."""
    xs = x.rows
    refs = [xs @ w.float().t() for w in weights]
    base = x.mean_abs.clamp(min=1e-5)
    best = (float("inf"), torch.ones_like(base), 0.0)
    for step in range(AWQ_GRID):
        alpha = step / AWQ_GRID
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, refs):
            wq = fake_quantize(w.float() * s[None, :], opts) / s[None, :]
            err += (xs @ wq.t() - ref).pow(2).mean().item()
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def apply_awq(state: dict[str, torch.Tensor], inputs: dict[str, LayerInputs], cfg, opts: QuantizeOptions, log) -> dict:
    """Search and fold the scales into `state` (float32 weights, changed in place). Returns the alphas
    chosen, per projection group, for the record."""
    chosen = {}
    kv_groups = cfg.num_attention_heads // cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        groups: list[tuple[str, list[str], Callable[[torch.Tensor], None]]] = [
            (a + "q_proj", [a + "q_proj", a + "k_proj", a + "v_proj"], _divide_rows_of(state, p + "input_layernorm")),
            (m + "gate_proj", [m + "gate_proj", m + "up_proj"], _divide_rows_of(state, p + "post_attention_layernorm")),
            (m + "down_proj", [m + "down_proj"], _divide_rows_of(state, m + "up_proj")),
        ]
        if kv_groups == 1:  # o_proj's input channels are V's output channels one to one
            groups.append((a + "o_proj", [a + "o_proj"], _divide_rows_of(state, a + "v_proj")))
        for source, names, fold in groups:
            ws = [state[f"{n}.weight"] for n in names]
            s, alpha = search_scales(inputs[source], ws, opts)
            for n in names:
                state[f"{n}.weight"].mul_(s[None, :])
            fold(s)
            chosen[source] = alpha
        if i % 8 == 7:
            log(f"AWQ: {i + 1} of {cfg.num_hidden_layers} layers")
    return chosen


def _divide_rows_of(state: dict[str, torch.Tensor], name: str) -> Callable[[torch.Tensor], None]:
    """Fold 1/s into the operation producing the scaled input: a norm's weight, or a projection's
    output rows (and its bias)."""

    def fold(s: torch.Tensor) -> None:
        w = state[f"{name}.weight"]
        if w.dim() == 1:
            w.div_(s)
        else:
            w.div_(s[:, None])
        if f"{name}.bias" in state:
            state[f"{name}.bias"].div_(s)

    return fold


LINEAR_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def linear_names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.{s}" for i in range(num_layers) for s in LINEAR_SUFFIXES]


def quantize_model(model, tokenizer, opts: QuantizeOptions, dtype: torch.dtype, calibration_tokens: int, log) -> tuple:
    """The quantized tensors of a float32 transformers model, and the record for engine.json."""
    from builders.text import token_ids

    cfg = model.config
    state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if tied or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    record: dict = {"method": opts.method}
    if opts.method == "int4":
        record.update(symmetric=opts.symmetric, group_size=opts.group_size, awq=opts.awq)
    if opts.method == "fp8":
        record["scales"] = opts.fp8_scales
    dense: list[int] = []
    if opts.dense_layers:
        if opts.dense_layers >= cfg.num_hidden_layers:
            n = cfg.num_hidden_layers
            raise ValueError(f"--dense-layers {opts.dense_layers} leaves none of the {n} layers quantized")
        ids, text = token_ids(tokenizer, "calibration", min(calibration_tokens, SENSITIVITY_TOKENS))
        log(f"ranking the {cfg.num_hidden_layers} layers by what {opts.method} costs each, over {len(ids)} tokens")
        scores = layer_sensitivity(model, ids, opts)
        dense = sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[: opts.dense_layers])
        record.update(dense_layers=dense, layer_kl=[round(v, 6) for v in scores], dense_calibration=text)
        log(f"layers kept dense: {dense}")
    if opts.method == "int4" and opts.awq:
        ids, text = token_ids(tokenizer, "calibration", calibration_tokens)
        log(f"AWQ: collecting activations over {len(ids)} calibration tokens")
        inputs = collect_inputs(model, ids)
        alphas = apply_awq(state, inputs, cfg, opts, log)
        if opts.lm_head:
            s, alphas["lm_head"] = search_scales(inputs["lm_head"], [state["lm_head.weight"]], opts)
            state["lm_head.weight"].mul_(s[None, :])
            state["model.norm.weight"].div_(s)
        record["calibration"] = text
        record["awq_alpha"] = {k: round(v, 2) for k, v in alphas.items()}
    out: dict[str, torch.Tensor] = {}
    names = [n for n in linear_names(cfg.num_hidden_layers) if int(n.split(".")[2]) not in dense]
    names += ["lm_head"] if opts.lm_head else []
    groups = set()
    for name in names:
        w = state.pop(f"{name}.weight")
        for part, t in quantize_weight(w, opts).items():
            out[f"{name}.{part}"] = t.contiguous()
        if opts.method == "int4":
            groups.add(group_size_for(w.shape[1], opts.group_size))
    if not opts.lm_head and tied:
        state.pop("lm_head.weight")
    elif not opts.lm_head:
        out["lm_head.weight"] = state.pop("lm_head.weight").to(dtype)
    for k, v in state.items():
        out[k] = v.to(dtype).contiguous()
    if groups:
        record["group_sizes_used"] = sorted(groups)
    record["lm_head"] = opts.method if opts.lm_head else "dense"
    return out, record


# ---- a GGUF file's own 4-bit blocks --------------------------------------------------------------

_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
BLOCK = 32  # weights per Q4_0 / Q4_1 block


def gguf_block_codes(raw, kind: str, n: int, k: int) -> dict[str, torch.Tensor]:
    """Q4_0 (d, 16 bytes of codes: w = d * (q - 8)) or Q4_1 (d, m, codes: w = d * q + m) blocks of an
    [N, K] tensor -> our int4 layout with group 32, holding the same codes and the same float16
    numbers, so the weights are the file's exactly."""
    import numpy as np

    head = 2 if kind == "Q4_0" else 4
    blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, head + 16)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
    qs = torch.from_numpy(blocks[..., head:].copy())
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # byte j: weight j (low nibble) and weight j + 16
    if kind == "Q4_0":
        offset = (-8 * d.float()).half()
        if not torch.equal(offset.float(), -8 * d.float()):
            raise ValueError("a Q4_0 scale times -8 does not fit in float16")
    else:
        offset = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
    return {"qweight": pack_int4(codes.reshape(n, k)), "scale": d, "offset": offset}


def _unpermute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores Llama's Q and K rows in interleaved rotary order; transformers (and we) use
    the split-halves order. Rows only: each row's blocks are untouched."""
    rows = t.shape[0]
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def gguf_int4_tensors(path, cfg) -> tuple[dict[str, torch.Tensor], dict]:
    """The 4-bit projection tensors of a GGUF file, ready to save; other tensors are left to the
    caller (dequantized by transformers)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    out: dict[str, torch.Tensor] = {}
    kinds = set()
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_NAMES or parts[3] != "weight":
            continue
        kind = t.tensor_type.name
        if kind not in ("Q4_0", "Q4_1"):
            raise ValueError(f"{t.name} is {kind}; --quantize gguf serves Q4_0 and Q4_1 tensors as they are")
        k, n = (int(x) for x in t.shape)  # GGUF lists the contiguous (input) dimension first
        codes = gguf_block_codes(t.data, kind, n, k)
        role = _GGUF_NAMES[parts[2]]
        if arch == "llama" and role in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = cfg.num_attention_heads if role.endswith("q_proj") else cfg.num_key_value_heads
            codes = {name: _unpermute_rows(v, heads) for name, v in codes.items()}
        name = f"model.layers.{parts[1]}.{role}"
        out.update({f"{name}.{p}": v.contiguous() for p, v in codes.items()})
        kinds.add(kind)
    expected = len(linear_names(cfg.num_hidden_layers)) * 3
    if len(out) != expected:
        raise ValueError(f"{path}: found {len(out) // 3} 4-bit projections, expected {expected // 3}")
    return out, {"method": "int4", "source": "gguf", "gguf_types": sorted(kinds), "group_sizes_used": [BLOCK]}
