"""The settings table: one name and one default per setting, strict parsing, and the generated docs."""

from __future__ import annotations

import argparse

import pytest

from python_backend.engine import config
from python_backend.engine.config import BuildConfig, EngineConfig, ServingConfig
from python_backend.engine.engine import Engine
from tests.conftest import ROOT


def test_docs_table_is_generated_from_the_declarations():
    assert (ROOT / "docs" / "settings.md").read_text() == config.markdown(), (
        "docs/settings.md is stale: python -m python_backend.engine.config > docs/settings.md"
    )


def test_every_setting_round_trips_through_config_pbtxt_text():
    engine = EngineConfig(kv_block_size=32, scheduler="mlfq", enable_prefix_caching=False, mlfq_ratio=3.0)
    serving = ServingConfig(engine_process=False, stream_interval=4)
    params = config.to_parameters([engine, serving])
    assert params["kv_block_size"] == "32" and params["enable_prefix_caching"] == "false"
    assert EngineConfig.from_parameters(params) == engine
    assert ServingConfig.from_parameters(params) == serving


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("enable_prefix_caching", "ture", "enable_prefix_caching='ture': must be true or false"),
        ("engine_process", "yes please", "engine_process='yes please': must be true or false"),
        ("scheduler", "lifo", "scheduler='lifo': must be one of fcfs, mlfq"),
        ("kv_block_size", "16.5", "kv_block_size='16.5': must be a whole number"),
        ("max_num_seqs", "0", "max_num_seqs=0: must be at least 1"),
        ("mlfq_ratio", "nan", "mlfq_ratio='nan': must be a finite number"),
        ("device", "tpu", "device='tpu': must be cpu, gpu, cuda or cuda:N"),
        ("run_ahead", "maybe", "run_ahead='maybe': must be one of auto, on, off"),
    ],
)
def test_a_value_that_does_not_parse_names_the_key_and_what_it_takes(key, value, message):
    with pytest.raises(ValueError) as e:
        config.check_keys({key: value})
        (ServingConfig if key in ServingConfig.__dataclass_fields__ else EngineConfig).from_parameters({key: value})
    assert message in str(e.value)


def test_an_unknown_key_is_refused():
    with pytest.raises(ValueError, match="unknown parameter kv_blocksize"):
        config.check_keys({"kv_blocksize": "16"})
    with pytest.raises(ValueError, match=r"scheduler_policy \(now scheduler\)"):
        config.check_keys({"scheduler_policy": "fcfs"})
    config.check_keys({"EXECUTION_ENV_PATH": "$$TRITON_MODEL_DIRECTORY/env.tar.gz", "scheduler": "mlfq"})


def test_a_setting_given_in_python_is_checked_as_strictly(tmp_path):
    with pytest.raises(ValueError, match="scheduler='lifo'"):
        config.validate(EngineConfig(scheduler="lifo"))
    with pytest.raises(ValueError, match="max_num_seqs='8'"):
        config.validate(EngineConfig(max_num_seqs="8"))
    with pytest.raises(ValueError, match="scheduler='lifo'"):
        Engine(tmp_path, EngineConfig(scheduler="lifo"))


def test_builder_flags_are_the_settings_with_dashes():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, EngineConfig)
    config.add_arguments(parser, ServingConfig)
    config.add_arguments(parser, BuildConfig)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings}
    assert {s.flag for s in config.settings()} <= flags
    args = parser.parse_args(["--kv-block-size", "32", "--no-engine-process"])
    assert config.from_arguments(args, EngineConfig).kv_block_size == 32
    assert config.from_arguments(args, ServingConfig).engine_process is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--scheduler", "lifo"])


def test_build_settings_are_not_config_pbtxt_parameters():
    """What the builder does to the weights lives in engine.json: a config.pbtxt cannot change it."""
    with pytest.raises(ValueError, match="unknown parameter quantize"):
        config.check_keys({"quantize": "int4"})
    assert "quantize" not in config.to_parameters([EngineConfig(), ServingConfig()])
