"""The flat run configuration: routing, coercion, validation, overrides."""

import pytest

from common.config import ConfigError, RunConfig, parse_overrides


def test_defaults_are_the_embedded_cpu_federation():
    config = RunConfig()
    assert config.model.model_name == "minilm" and config.data.dataset == "bbc_news"
    assert config.federation.method == "subspace_reg" and config.data.num_clients == 10
    assert config.federation.clients_per_round(10) == 3
    assert config.model.scaling == 2.0


def test_flat_keys_route_to_their_component_and_round_trip():
    config = RunConfig.from_flat({"lora_rank": 4, "mu": 0.1, "max_length": 32, "learning_rate": "2e-4"})
    assert (config.model.lora_rank, config.federation.mu, config.data.max_length) == (4, 0.1, 32)
    assert config.train.learning_rate == pytest.approx(2e-4)
    assert RunConfig.from_json(config.to_json()) == config


def test_unknown_key_names_the_nearest_known_one():
    with pytest.raises(ConfigError, match="unknown config key 'lora_rnak'; did you mean 'lora_rank'"):
        RunConfig.from_flat({"lora_rnak": 8})


@pytest.mark.parametrize("key, value, message", [
    ("method", "fedprox", "use one of fedavg, svd, fedsvd, subspace_reg"),
    ("client_fraction", 0.0, "client_fraction=0.0"),
    ("lora_rank", 2.5, "lora_rank=2.5: expected int"),
    ("num_clients", None, "null is not allowed"),
    ("dtype", "int8", "use float32, float16 or bfloat16"),
])
def test_invalid_values_name_the_key_and_the_fix(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flat({key: value})


def test_cli_overrides_are_parsed_as_yaml_scalars(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: fedavg\nnum_rounds: 3\n")
    overrides = parse_overrides(["num_rounds=5", "max_effective_lora_update_norm=null", "target_modules=[query, value]"])
    config = RunConfig.load(path, overrides)
    assert config.federation.method == "fedavg" and config.federation.num_rounds == 5
    assert config.federation.max_effective_lora_update_norm is None
    assert config.model.target_modules == ["query", "value"]
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_overrides(["num_rounds"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    run_configs = [path for path in sorted(Path(__file__).resolve().parents[2].glob("configs/*.yaml"))
                   if not path.name.startswith("grid_")]   # grid files: tests/experiments/test_grid.py
    assert len(run_configs) >= 4
    for path in run_configs:
        RunConfig.load(path)
