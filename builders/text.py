"""Calibration and evaluation text that needs no network: the documentation strings of the Python
standard library that runs the build.

The modules are split in two fixed halves, so calibration (what AWQ measures activations on) and
evaluation (what perplexity is measured on) never share a sentence. The text is the same for the
same Python version; its sha256 is recorded with every result, so two figures can be checked to
come from the same text.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import platform
from dataclasses import dataclass

# Prose-rich modules that import without side effects on every platform we run on.
_MODULES = (
    "argparse", "asyncio.events", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.cookies", "imaplib", "inspect", "ipaddress", "itertools", "json",
    "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest.case",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)  # fmt: skip
SPLITS = ("calibration", "evaluation")


@dataclass(frozen=True)
class Corpus:
    split: str
    text: str
    modules: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def record(self, tokens: int | None = None) -> dict:
        """What a result cites: where the text came from and which text exactly."""
        rec = {
            "split": self.split,
            "source": f"docstrings of {len(self.modules)} Python {platform.python_version()} standard-library modules",
            "modules": list(self.modules),
            "characters": len(self.text),
            "sha256": self.sha256,
        }
        if tokens is not None:
            rec["tokens"] = tokens
        return rec


def _docstrings(module_name: str) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    docs = [inspect.getdoc(module) or ""]
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for attr in sorted(vars(obj)):
                    member = vars(obj)[attr]
                    if not attr.startswith("_") and inspect.isfunction(member):
                        docs.append(inspect.getdoc(member) or "")
    return [d.strip() for d in docs if d and len(d.strip()) >= 40]


def _paragraphs(modules: tuple[str, ...]) -> list[str]:
    seen: set[str] = set()
    out = []
    for name in modules:
        for doc in _docstrings(name):
            for para in doc.split("\n\n"):
                para = para.strip()
                if para and para not in seen:  # a docstring inherited under two names counts once
                    seen.add(para)
                    out.append(para)
    return out


def corpus(split: str) -> Corpus:
    """The calibration modules are the even-numbered ones of _MODULES, the evaluation ones the odd;
    a paragraph that occurs in both (a shared boilerplate sentence) is kept for calibration only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    modules = _MODULES[SPLITS.index(split) :: 2]
    parts = _paragraphs(modules)
    if split == "evaluation":
        calibration = set(_paragraphs(_MODULES[0::2]))
        parts = [p for p in parts if p not in calibration]
    return Corpus(split, "\n\n".join(parts), modules)


def token_ids(tokenizer, split: str, num_tokens: int) -> tuple[list[int], dict]:
    """The first `num_tokens` token ids of a split, and the record that describes them."""
    c = corpus(split)
    ids = tokenizer(c.text, add_special_tokens=False).input_ids
    if len(ids) < num_tokens:
        raise ValueError(f"the {split} text has {len(ids)} tokens, fewer than the {num_tokens} asked for")
    return ids[:num_tokens], c.record(num_tokens)
