"""A view of a site-packages folder for the Triton Python-backend stub of nvidia-pytriton 0.7, whose
tensors use the numpy 1.x ABI: symbolic links to every package except numpy and the packages compiled
against numpy 2 (which fail to import beside numpy 1.x). For hosts whose own packages have numpy 2.

    python3 scripts/stub_site.py HOST_SITE_PACKAGES OUT_FOLDER
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# compiled against numpy 2, or pulling in something that is; none is needed to serve
LEFT_OUT = {
    "numpy",
    "scipy",
    "sklearn",
    "scikit_learn",
    "pandas",
    "torchvision",
    "torchaudio",
    "jax",
    "jaxlib",
    "jax_plugins",
    "jax_cuda13_pjrt",
    "jax_cuda13_plugin",
    "numba",
    "numba_cuda",
    "cupy",
    "cupyx",
    "cupy_backends",
    "cupy_cuda13x",
    "h5py",
    "matplotlib",
    "mpl_toolkits",
    "cv2",
    "opencv_python_headless",
    "skimage",
    "scikit_image",
    "pyarrow",
    "sentence_transformers",
    "timm",
    "tensorboard",
    "torch_geometric",
    "statsmodels",
    "xarray",
    "seaborn",
    "contourpy",
    "ml_dtypes",
    "tensorstore",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnx_ir",
    "flax",
    "optax",
    "chex",
    "orbax",
    "orbax_checkpoint",
    "equinox",
    "diffrax",
    "numpyro",
    "botorch",
    "gpytorch",
    "linear_operator",
    "imageio",
    "tifffile",
    "lightning",
    "pytorch_lightning",
    "torchmetrics",
    "sacrebleu",
    "patsy",
    "formulaic",
    "pyro",
    "peft",
    "accelerate",
    "lineax",
    "optimistix",
    "treescope",
    "e3nn",
    "kiwisolver",
    "fontTools",
    "fonttools",
    "cupy_cuda12x",
    "torchdiffeq",
}


def package_name(entry: str) -> str:
    """'numpy-2.5.2.dist-info' -> 'numpy', 'scikit_learn.libs' -> 'scikit_learn', 'cv2' -> 'cv2'."""
    stem = re.sub(r"\.(dist-info|egg-info|libs|pth|py)$", "", entry)
    stem = re.sub(r"-\d.*$", "", stem)
    return stem.replace("-", "_").replace(".", "_").lower()


def main(site: str, out: str) -> None:
    left_out = {n.lower() for n in LEFT_OUT}
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    kept = 0
    for entry in sorted(Path(site).iterdir()):
        if package_name(entry.name) in left_out or entry.name.startswith("__pycache__"):
            continue
        link = dest / entry.name
        if not link.exists():
            link.symlink_to(entry)
        kept += 1
    print(f"stub site: {kept} entries of {site} in {out}, numpy and {len(left_out)} numpy-2 packages left out")


if __name__ == "__main__":
    main(*sys.argv[1:3])
