"""ExperimentConfig validates on construction and loads from TOML with overrides."""

from __future__ import annotations

import pytest

from sentinel_core import ExperimentConfig, SentinelError


def test_defaults_are_valid():
    config = ExperimentConfig()
    assert config.pruning_percent == 0.3
    assert config.scorer == "entropy" and config.fine_tune == "plain"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("pruning_percent", 1.0, "pruning_percent must be a fraction in [0, 1)"),
        ("pruning_percent", -0.1, "got -0.1"),
        ("num_epochs", 0, "num_epochs must be a positive integer, got 0"),
        ("batch_size", -3, "batch_size must be a positive integer, got -3"),
        ("learning_rate", 0.0, "learning_rate must be positive"),
        ("device", "tpu", "device 'tpu' is not valid"),
        ("device", "cuda:7", "device 'cuda:7'"),
        ("prune_mode", "delete", "prune_mode must be one of remove, mask, got 'delete'"),
        ("batch_size", "8", "batch_size must be int, got '8'"),
        ("test_mode", 1, "test_mode must be bool, got 1"),
        ("block_size", 1, "block_size must be at least 2"),
    ],
)
def test_bad_values_name_the_value_and_the_fix(field, value, fragment):
    with pytest.raises(SentinelError) as info:
        ExperimentConfig(**{field: value})
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_growth_needs_a_strategy_and_room():
    with pytest.raises(SentinelError, match="growth_strategy"):
        ExperimentConfig(growth_percent=0.1)
    with pytest.raises(SentinelError, match="exceeds pruning_percent"):
        ExperimentConfig(pruning_percent=0.1, growth_percent=0.2, growth_strategy="random")


def test_ints_are_accepted_for_floats():
    config = ExperimentConfig(learning_rate=1, pruning_percent=0)
    assert isinstance(config.learning_rate, float) and config.learning_rate == 1.0


def test_toml_loads_and_flags_override(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[experiment]\npruning_percent = 0.5\nscorer = "magnitude"\nseed = 7\n'
                    '[experiment.options]\nadaptive_boost = 2.0\n')
    config = ExperimentConfig.from_toml(path, seed=11)
    assert (config.pruning_percent, config.scorer, config.seed) == (0.5, "magnitude", 11)
    assert config.options == {"adaptive_boost": 2.0}


def test_toml_errors_are_one_line(tmp_path):
    with pytest.raises(SentinelError, match="does not exist"):
        ExperimentConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("pruning_percent = [")
    with pytest.raises(SentinelError, match="not valid TOML"):
        ExperimentConfig.from_toml(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("pruning_percnt = 0.2\n")
    with pytest.raises(SentinelError, match="unknown config key 'pruning_percnt'; valid keys are: .*pruning_percent"):
        ExperimentConfig.from_toml(typo)


def test_round_trip_through_dict():
    config = ExperimentConfig(pruning_percent=0.4, options={"x": 1})
    assert ExperimentConfig.from_dict(config.to_dict()) == config
