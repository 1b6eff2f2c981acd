"""Reads and checks the engine folder the builder wrote; refuses one it cannot use, naming the file
and the reason, before anything heavy is loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_FORMAT_VERSIONS = (1,)


class EngineFolderError(RuntimeError):
    pass


@dataclass
class EngineFolder:
    path: Path
    meta: dict  # engine.json
    hf_config: dict  # config.json

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.meta.get("eos_token_ids") or [])

    @property
    def quantization(self) -> str | None:
        """The method the weights are stored in (models/quantized.py), None for dense weights."""
        q = self.meta.get("quantization")
        return q.get("method") if isinstance(q, dict) else None

    @property
    def graph(self) -> dict:
        """The exported graphs (builders/onnx_export.py): file names under "onnx" and "tensorrt", the
        check's record; empty for an entry built for PyTorch alone."""
        g = self.meta.get("graph")
        return g if isinstance(g, dict) else {}

    def runner(self, asked: str) -> str:
        """The runner a setting of `runner` means for this folder, refusing one it has no file for."""
        if asked == "auto":
            return "tensorrt" if self.graph.get("tensorrt") else "onnxruntime" if self.graph.get("onnx") else "pytorch"
        need = {"onnxruntime": ("onnx", "onnx"), "tensorrt": ("tensorrt", "tensorrt")}.get(asked)
        if need and not self.graph.get(need[0]):
            raise EngineFolderError(f"{self.path}: runner {asked} needs an entry built with --backend {need[1]}")
        return asked

    @property
    def two_four(self) -> bool:
        """The builder pruned the projections to 2:4 semi-structured sparsity."""
        p = self.meta.get("pruning")
        return isinstance(p, dict) and p.get("method") == "2:4"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise EngineFolderError(f"{path}: missing (is this an engine folder written by `fastserve build`?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineFolderError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise EngineFolderError(f"{path}: expected a JSON object")
    return data


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing (short header, truncated data), or None. Reads
    only the header, so it is cheap enough to run before every load."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "corrupt safetensors file (shorter than its 8-byte header length)"
            n = int.from_bytes(raw, "little")
            if n > 100_000_000:
                return f"corrupt safetensors file (header length {n} is not plausible)"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"corrupt safetensors file ({e})"
    size = path.stat().st_size
    if size < 8 + n + end:
        return f"corrupt safetensors file (truncated: {size} bytes, its header describes {8 + n + end})"
    return None


def open_engine_folder(path: str | Path) -> EngineFolder:
    folder = Path(path)
    if not folder.is_dir():
        raise EngineFolderError(f"{folder}: engine folder not found; build one with `fastserve build`")
    meta = _read_json(folder / "engine.json")
    version = meta.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise EngineFolderError(
            f"{folder / 'engine.json'}: format_version {version!r} is not one this backend "
            f"reads ({', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); rebuild the engine"
        )
    config = _read_json(folder / "config.json")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise EngineFolderError(f"{folder}: no *.safetensors weights")
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            raise EngineFolderError(f"{path}: {problem}; rebuild the engine")
    q = meta.get("quantization")
    if q is not None:
        from python_backend.models.quantized import METHODS

        if not isinstance(q, dict) or q.get("method") not in METHODS:
            method = q.get("method") if isinstance(q, dict) else q
            raise EngineFolderError(
                f"{folder / 'engine.json'}: quantization method {method!r} is unknown; this backend serves "
                f"{', '.join(METHODS)}"
            )
    graph = meta.get("graph") or {}
    for kind in ("onnx", "tensorrt"):
        name = graph.get(kind)
        if name and not (folder / name).is_file():
            raise EngineFolderError(f"{folder / name}: missing ({kind} graph named in engine.json); rebuild the engine")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise EngineFolderError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")
    return EngineFolder(folder, meta, config)
