"""Build a pool entry: one Triton model in front of several built members, routed per request.

    python builders/build.py --pool NAME --members a,b,c [--repository R] [--quality-weight 0.7]
    python builders/build.py --pool NAME --pool-file pool.json

Writes <repository>/<NAME>/config.pbtxt (the members' inputs and outputs plus the pool's own),
1/model.py and pool.json, the settings the running pool watches: edit pool.json and the pool
applies the change without a restart. Each member's prior quality comes from its `fastserve
evaluate` figures in engine.json (teacher-forced agreement where measured, else perplexity relative
to the best member), else 0.5; its seats from its max_num_seqs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from builders.repository import EntrySettings, atomic_write, render_config
from python_backend.pool.router import PoolConfig, PoolConfigError
from python_backend.tensors import POOL_INPUTS, POOL_OUTPUTS

POOL_MODEL_PY = '''"""Triton loads this file; the model itself is FastServe's pool router."""

from python_backend.pool.model import TritonPythonModel  # noqa: F401
'''


class PoolBuildError(ValueError):
    """A pool the builder will not write; the message names the member or setting."""


def _member_facts(repository: Path, name: str) -> dict:
    entry = repository / name
    config = entry / "config.pbtxt"
    if not config.is_file():
        raise PoolBuildError(f"member {name}: no entry {entry} (build it first, then the pool)")
    text = config.read_text()
    model_py = entry / "1" / "model.py"
    if model_py.is_file() and "python_backend.pool" in model_py.read_text(errors="replace"):
        raise PoolBuildError(f"member {name} is itself a pool")
    seats = re.search(r'key: "max_num_seqs" value: \{ string_value: "(\d+)" \}', text)
    meta_path = entry / "1" / "engine" / "engine.json"
    evaluation = json.loads(meta_path.read_text()).get("evaluation") if meta_path.is_file() else None
    return {"seats": int(seats.group(1)) if seats else 1, "evaluation": evaluation or {}}


def pool_settings(repository: Path, members: list[str], **settings) -> dict:
    """pool.json's content for these members, priors taken from their evaluations."""
    facts = {m: _member_facts(repository, m) for m in members}
    ppl = {m: f["evaluation"].get("perplexity") for m, f in facts.items()}
    best = min((p for p in ppl.values() if p), default=None)
    out = []
    for m, f in facts.items():
        agreement = f["evaluation"].get("agreement")
        if agreement is not None:
            quality = float(agreement)
        elif best and ppl[m]:
            quality = 0.9 * best / ppl[m]
        else:
            quality = 0.5
        out.append({"name": m, "quality": round(quality, 4), "seats": f["seats"]})
    return {"members": out, **{k: v for k, v in settings.items() if v is not None}}


def build_pool(repository: Path, name: str, settings: dict) -> Path:
    """Write the pool entry; returns its folder."""
    try:
        PoolConfig.from_dict(settings)
    except PoolConfigError as e:
        raise PoolBuildError(str(e)) from None
    members = [m["name"] if isinstance(m, dict) else m for m in settings["members"]]
    if name in members:
        raise PoolBuildError(f"the pool {name} cannot be one of its own members")
    for m in members:
        _member_facts(repository, m)
    entry = repository / name
    (entry / "1").mkdir(parents=True, exist_ok=True)
    atomic_write(entry / "1" / "model.py", POOL_MODEL_PY)
    atomic_write(entry / "pool.json", json.dumps(settings, indent=2) + "\n")
    config = EntrySettings(name=name, parameters={"pool_file": "pool.json", "state_file": "router_state.json"})
    atomic_write(entry / "config.pbtxt", render_config(config, POOL_INPUTS, POOL_OUTPUTS))
    return entry


def add_pool_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool", required=True, help="the pool's model name in the repository")
    p.add_argument("--members", default=None, help="comma-separated member entries, already built")
    p.add_argument("--pool-file", default=None, help="a pool.json to use instead of --members and the flags below")
    p.add_argument("--repository", default="model_repository", help="model repository folder")
    p.add_argument("--quality-weight", type=float, default=None, help="weight of quality against latency, 0..1")
    p.add_argument("--exploration", type=float, default=None, help="the bandit's exploration (LinUCB alpha)")
    p.add_argument("--cache-size", type=int, default=None, help="temperature-0 answers cached (0: none)")


def run(args: argparse.Namespace) -> int:
    repository = Path(args.repository)
    try:
        if args.pool_file:
            settings = json.loads(Path(args.pool_file).read_text())
        elif args.members:
            settings = pool_settings(
                repository,
                [m.strip() for m in args.members.split(",") if m.strip()],
                quality_weight=args.quality_weight,
                exploration=args.exploration,
                cache_size=args.cache_size,
            )
        else:
            raise PoolBuildError("give --members a,b,c or --pool-file")
        entry = build_pool(repository, args.pool, settings)
    except (PoolBuildError, OSError, json.JSONDecodeError) as e:
        print(f"pool build failed: {e}", file=sys.stderr)
        return 2
    members = [m if isinstance(m, dict) else {"name": m} for m in settings["members"]]
    names = ", ".join(f"{m['name']} (quality {m.get('quality', 0.5)})" for m in members)
    print(f"pool {args.pool} in {entry}: {names}")
    return 0


def add_pool_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pool", help="build a pool entry that routes among built models")
    add_pool_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build.py --pool", description=__doc__.split("\n\n")[0])
    add_pool_arguments(parser)
    return run(parser.parse_args(argv))
