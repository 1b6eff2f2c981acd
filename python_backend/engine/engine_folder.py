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
    if not list(folder.glob("*.safetensors")):
        raise EngineFolderError(f"{folder}: no *.safetensors weights")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise EngineFolderError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")
    return EngineFolder(folder, meta, config)
