"""Compile every Triton kernel of the engine for a GPU architecture ahead of time, without a GPU.

Triton's interpreter, which runs the kernels on CPUs, checks what they compute but not what the
compiler accepts: a loop that reassigns a bfloat16 tile to float32, for one, passes every CPU test
and fails to compile for a GPU. This compiles each kernel in the specialisations a decode or prefill
step uses, with Triton's own ptxas (tests/python_backend/ops/test_compile_sm90.py runs it).

    python3 scripts/compile_kernels.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("compile_kernels.py compiles; run it without TRITON_INTERPRET=1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from python_backend.ops import argmax, fp8_rows, fused, fused_qkv, gemv, quant_gemv  # noqa: E402
from python_backend.ops import triton_attention as ta

POINTERS = {  # argument -> element type where it is a pointer; the rest are int32 unless named below
    "X": "bf16",
    "RES": "bf16",
    "LN": "bf16",
    "W": "bf16",
    "B": "bf16",
    "POS": "i64",
    "COS": "bf16",
    "SIN": "bf16",
    "SLOTS": "i64",
    "Q_OUT": "bf16",
    "K_CACHE": "bf16",
    "V_CACHE": "bf16",
    "RES_OUT": "bf16",
    "OUT": "bf16",
    "Q": "bf16",
    "K": "bf16",
    "V": "bf16",
    "TABLES": "i64",
    "LENS": "i64",
    "O_PART": "fp32",
    "LSE_PART": "fp32",
    "COUNTS": "i32",
    "QKV": "bf16",
    "CU_Q": "i32",
    "CTX": "i32",
    "VAL": "fp32",
    "IDX": "i32",
}
SCALARS = {"eps": "fp32", "scale": "fp32"}


def _compile(arch: int, kernel, constants: dict, pointers: dict | None = None, num_warps: int = 4, **options) -> None:
    types = {**POINTERS, **(pointers or {})}
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in SCALARS:
            signature[name] = SCALARS[name]
        elif name in types and not (name == "K" and "W" in kernel.arg_names):  # K: a length beside weights
            signature[name] = "*" + types[name]
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, **options})


def kernels(arch: int) -> list[tuple[str, object, dict, dict]]:
    """(label, kernel, constants, pointer types and options) for each specialisation a step uses."""
    out = []
    for silu_mul, defer, pdl in ((False, False, False), (True, False, True), (False, True, False)):
        out.append(
            (
                f"gemv silu_mul={silu_mul} defer={defer} pdl={pdl}",
                gemv._gemv_kernel,
                {
                    "M_PAD": 2,
                    "BLOCK_N": 4,
                    "BLOCK_K": 1024,
                    "HAS_BIAS": True,
                    "SILU_MUL": silu_mul,
                    "DEFER": defer,
                    "PDL": pdl,
                },
                {"pointers": {"OUT": "fp32"}, "launch_pdl": pdl},
            )
        )
    for has_add, pdl in ((True, False), (False, True)):
        out.append(
            (
                f"fused_qkv add={has_add} pdl={pdl}",
                fused_qkv._add_norm_qkv_rope_kernel,
                {
                    "H": 32,
                    "HKV": 8,
                    "D": 64,
                    "M_PAD": 1,
                    "BLOCK_P": 2,
                    "BLOCK_K": 1024,
                    "HAS_ADD": has_add,
                    "HAS_BIAS": not has_add,
                    "PDL": pdl,
                },
                {"launch_pdl": pdl},
            )
        )
    # a cache of bfloat16 values, of int8 codes, of E4M3 codes (by their bits, or by the GPU's
    # conversion, on sm 8.9 and later), each in the tile a decode step takes for it by default
    caches = [(ta.PLAIN, "bf16"), (ta.INT8_CODES, "i8"), (ta.FP8_CODES, "u8")]
    if arch >= 89:
        caches.append((ta.FP8_CODES_NATIVE, "u8"))
    for codes, cache in caches:
        tile = ta.default_decode_config(64, codes)
        for splits in (1, 16):
            out.append(
                (
                    f"decode attention cache={cache} codes={codes} splits={splits} {tile}",
                    ta._decode_kernel,
                    {
                        "HKV": 8,
                        "GROUP": 4,
                        "GROUP_PAD": 16,
                        "D": 64,
                        "BLOCK_SIZE": 16,
                        "BLOCK_N": tile.block_n,
                        "NUM_SPLITS": splits,
                        "PREC": "tf32",
                        "PDL": False,
                        "KV_CODES": codes,
                        "HALF_DOT": tile.half_dot and codes != ta.PLAIN,
                    },
                    {
                        "pointers": {"K": cache, "V": cache},
                        "num_warps": tile.num_warps,
                        "num_stages": tile.num_stages,
                    },
                )
            )
        out.append(
            (
                f"prefill attention cache={cache} codes={codes}",
                ta._prefill_kernel,
                {
                    "HKV": 8,
                    "GROUP": 4,
                    "D": 64,
                    "BLOCK_SIZE": 16,
                    "BLOCK_M": 64,
                    "BLOCK_N": 64,
                    "PREC": "tf32",
                    "KV_CODES": codes,
                },
                {"pointers": {"K": cache, "V": cache}},
            )
        )
        if codes != ta.FP8_CODES_NATIVE:  # the write takes codes by their bits
            out.append(
                (
                    f"rope + KV write cache={cache} codes={codes}",
                    ta._rope_write_kv_kernel,
                    {"H": 32, "HKV": 8, "D": 64, "H_PAD": 32, "HKV_PAD": 8, "BLOCK_SIZE": 16, "KV_CODES": codes},
                    {"pointers": {"K_CACHE": cache, "V_CACHE": cache}},
                )
            )
    out += [
        ("add + RMSNorm", fused._add_rms_norm_kernel, {"BLOCK": 2048, "HAS_RES": True, "PDL": False}, {}),
        ("SiLU and multiply", fused._silu_mul_kernel, {"BLOCK": 1024}, {}),
        ("argmax chunks", argmax._chunk_max_kernel, {"BLOCK": 4096}, {"pointers": {"X": "fp32"}}),
        ("argmax pick", argmax._pick_chunk_kernel, {"C_PAD": 64}, {"pointers": {"OUT": "i64"}}),
    ]
    scales = {"S": "fp16", "O": "fp16"}
    for rows in (1, 8):
        out += [
            (
                f"int4 GEMV rows={rows}",
                quant_gemv._int4_kernel,
                {"M_PAD": rows, "BLOCK_N": 4, "BLOCK_K": 1024, "GROUP": 128},
                {"pointers": {"W": "i32", **scales}},
            ),
            (
                f"int8 GEMV rows={rows}",
                quant_gemv._int8_kernel,
                {"M_PAD": rows, "BLOCK_N": 4, "BLOCK_K": 1024},
                {"pointers": {"W": "i32", "S": "fp32"}},
            ),
            (
                f"fp8 GEMV rows={rows}",
                quant_gemv._fp8_kernel,
                {"M_PAD": rows, "BLOCK_N": 4, "BLOCK_K": 512},
                {"pointers": {"W": "fp8e4nv", "S": "fp32"}},
            ),
        ]
    for one_pass in (True, False):
        out.append(
            (
                f"fp8 activation rows one_pass={one_pass}",
                fp8_rows._fp8_rows_kernel,
                {"BLOCK_K": 2048, "ONE_PASS": one_pass},
                {"pointers": {"Q": "fp8e4nv", "S": "fp32"}},
            )
        )
    for int4, w in ((True, "u8"), (False, "i8")):
        out.append(
            (
                f"quantized GEMM int4={int4}",
                quant_gemv._mm_kernel,
                {"INT4": int4, "GROUP": 128, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "NUM_STAGES": 3},
                {"pointers": {"W": w, **scales}},
            )
        )
    out.append(
        (
            "dequantize int4",
            quant_gemv._dequant_kernel,
            {"IS_INT4": True, "GROUP": 128, "BLOCK_N": 16, "BLOCK_K": 256},
            {"pointers": {"W": "u8", **scales}},
        )
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for the H100 and H200")
    args = ap.parse_args()
    failed = 0
    for label, kernel, constants, extra in kernels(args.arch):
        try:
            _compile(args.arch, kernel, constants, **extra)
            print(f"ok      {label}")
        except Exception as exc:  # report every kernel, not just the first failure
            failed += 1
            print(f"FAILED  {label}: {type(exc).__name__}: {str(exc)[-400:]}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
