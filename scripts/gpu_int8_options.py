"""Int8 weight products a GPU offers besides our GEMV, timed at decode row counts on the Llama-3.2-1B
shapes under CUDA graphs: PyTorch's weight-only `_weight_int8pack_mm`, and cuBLAS's int8 GEMM
(`torch._int_mm`, which also needs int8 activations, at its smallest 32 rows), against bfloat16.

    PYTHONPATH=. python3 scripts/gpu_int8_options.py
"""

from __future__ import annotations

import torch

from python_backend.ops.gemv import graph_time

SHAPES = {"gate_up": (16384, 2048), "down": (2048, 8192), "lm_head": (128256, 2048)}


def per_call(product, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Seconds per `product(x, w)`, the weights taken in turn so none is still in L2."""
    return graph_time(lambda: [product(x, w) for w in weights]) / len(weights)


def main() -> None:
    dev = "cuda"
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, (n, k) in SHAPES.items():
        codes = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev) for _ in range(4)]
        scale = torch.rand(n, device=dev, dtype=torch.bfloat16) * 0.01
        dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(4)]
        xq = torch.randint(-127, 128, (32, k), dtype=torch.int8, device=dev)
        int8pack = lambda x, w, s=scale: torch.ops.aten._weight_int8pack_mm(x, w, s)  # noqa: E731
        for rows in (1, 4):
            x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
            ref = x.float() @ (codes[0].float() * scale.float()[:, None]).t()
            err = float((int8pack(x, codes[0]).float() - ref).norm() / ref.norm())
            times = {
                "bf16": per_call(torch.nn.functional.linear, x, dense),
                "weight_int8pack_mm": per_call(int8pack, x, codes),
                "int_mm_32_rows": per_call(lambda a, w: torch._int_mm(a, w.t()), xq, codes),
            }
            print(name, rows, {a: f"{b * 1e6:.1f} us" for a, b in times.items()}, f"int8pack rel err {err:.1e}")


if __name__ == "__main__":
    main()
