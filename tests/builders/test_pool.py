"""The pool builder: priors from the members' evaluations, seats from their settings, and the
refusals (a member not built, a pool in its own pool, bad settings)."""

from __future__ import annotations

import json

import pytest

from builders.pool import PoolBuildError, build_pool, main, pool_settings


def _member(repo, name: str, seqs: int, evaluation: dict | None) -> None:
    engine = repo / name / "1" / "engine"
    engine.mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nparameters {{ key: "max_num_seqs" value: {{ string_value: "{seqs}" }} }}\n'
    )
    (repo / name / "1" / "model.py").write_text("from python_backend.model import TritonPythonModel\n")
    (engine / "engine.json").write_text(json.dumps({"evaluation": evaluation} if evaluation else {}))


def test_priors_come_from_evaluations_and_seats_from_settings(tmp_path):
    _member(tmp_path, "big", 8, {"perplexity": 10.0})
    _member(tmp_path, "small", 4, {"perplexity": 20.0})
    _member(tmp_path, "judged", 2, {"perplexity": 12.0, "agreement": 0.97})
    _member(tmp_path, "fresh", 1, None)
    s = pool_settings(tmp_path, ["big", "small", "judged", "fresh"], quality_weight=0.6, exploration=None)
    got = {m["name"]: (m["quality"], m["seats"]) for m in s["members"]}
    assert got == {"big": (0.9, 8), "small": (0.45, 4), "judged": (0.97, 2), "fresh": (0.5, 1)}
    assert s["quality_weight"] == 0.6 and "exploration" not in s


def test_build_writes_an_entry_triton_can_load(tmp_path):
    _member(tmp_path, "a", 2, None)
    _member(tmp_path, "b", 2, None)
    assert main(["--pool", "p", "--members", "a,b", "--repository", str(tmp_path), "--cache-size", "0"]) == 0
    config = (tmp_path / "p" / "config.pbtxt").read_text()
    for name in ("text_input", "model", "quality_weight", "request_id", "reward", "served_by", "text_output"):
        assert f'name: "{name}"' in config
    assert 'name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true' in config
    assert "decoupled: true" in config and 'string_value: "pool.json"' in config
    assert "python_backend.pool.model" in (tmp_path / "p" / "1" / "model.py").read_text()
    assert json.loads((tmp_path / "p" / "pool.json").read_text())["cache_size"] == 0


def test_bad_pools_are_refused(tmp_path, capsys):
    _member(tmp_path, "a", 2, None)
    with pytest.raises(PoolBuildError, match="build it first"):
        build_pool(tmp_path, "p", {"members": ["a", "missing"]})
    with pytest.raises(PoolBuildError, match="its own members"):
        build_pool(tmp_path, "a", {"members": ["a"]})
    with pytest.raises(PoolBuildError, match=r"quality must be in \[0, 1\]"):
        build_pool(tmp_path, "p", {"members": [{"name": "a", "quality": 3}]})
    build_pool(tmp_path, "p", {"members": ["a"]})
    with pytest.raises(PoolBuildError, match="itself a pool"):
        build_pool(tmp_path, "q", {"members": ["p"]})
    assert main(["--pool", "p", "--repository", str(tmp_path)]) == 2
    assert "--members" in capsys.readouterr().err
