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


@pytest.mark.parametrize("key, value, message", [
    ("num_rounds", True, "num_rounds=true: expected int, not true/false"),
    ("learning_rate", True, "learning_rate=true: expected float, not true/false"),
    ("mu", False, "mu=false: expected float, not true/false"),
    ("max_update_norm", float("nan"), "max_update_norm=nan: must be a finite number \\(or null"),
    ("max_update_norm", "nan", "must be a finite number"),
    ("learning_rate", float("inf"), "learning_rate=inf: must be a finite number"),
    ("max_effective_lora_update_norm", "-inf", "must be a finite number"),
    ("seed", -1, "seed=-1: must be a whole number in \\[0, 2\\*\\*63\\)"),
    ("max_update_norm", 0, "max_update_norm=0.0: must be positive or null"),
    ("train_head", 2, "train_head=2: expected bool"),
    ("weight_decay", -0.1, "weight_decay=-0.1: must be non-negative"),
    ("per_device_eval_batch_size", 0, "per_device_eval_batch_size=0: must be at least 1"),
])
def test_booleans_non_finite_numbers_and_negative_seeds_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flat({key: value})


def test_the_same_holes_are_closed_on_the_command_line(tmp_path):
    for item, message in [("num_rounds=true", "num_rounds=true"), ("max_update_norm=.nan", "finite"),
                          ("seed=-3", "seed=-3")]:
        with pytest.raises(ConfigError, match=message):
            RunConfig.load(None, parse_overrides([item]))


STUDY_FILE = """\
# the reference study's own key set (RoBERTa-large / HellaSwag), unchanged
model_name: FacebookAI/roberta-large
torch_dtype: float32
trust_remote_code: false
gradient_checkpointing: true
lora_rank: 8
lora_alpha: 16
lora_dropout: 0.05
target_modules: [query, key, value, dense]
task: multiple_choice
dataset: Rowan/hellaswag
partition_type: dirichlet
partition_field: activity_label
num_clients: 10
dirichlet_alpha: 0.3
min_client_size: 8
max_train_samples: 8000
max_eval_samples: 1000
max_length: 256
per_device_train_batch_size: 1
per_device_eval_batch_size: 4
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
weight_decay: 0.01
max_grad_norm: 0.5
local_epochs: 1
max_local_steps: 30
algorithm: subspace_reg
num_rounds: 20
client_fraction: 0.3
seed: 42
mu: 0.05
alpha: 0.01
lambda_reg: 1.0e-5
max_effective_lora_update_norm: 0.0
checkpoint_every: 5
output_dir: outputs/roberta_subspace_reg
"""


def test_the_study_own_file_loads_and_says_what_each_foreign_key_means(tmp_path, caplog):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY_FILE)
    with caplog.at_level("INFO", logger="common.config"):
        config = RunConfig.load(path)
    assert config.federation.method == "subspace_reg"                 # algorithm
    assert config.model.dtype == "float32"                            # torch_dtype
    assert config.data.partitioning == "dirichlet"                    # partition_type
    assert config.federation.max_effective_lora_update_norm is None   # 0.0: no clip
    assert config.federation.output_dir == "outputs/roberta_subspace_reg"
    assert config.train.weight_decay == 0.01 and config.train.per_device_eval_batch_size == 4
    assert (config.model.lora_rank, config.train.gradient_accumulation_steps, config.federation.seed) == (8, 8, 42)
    lines = [record.getMessage() for record in caplog.records]
    for expected in ("algorithm: subspace_reg read as method: subspace_reg",
                     "torch_dtype: float32 read as dtype: float32",
                     "partition_type: dirichlet read as partitioning: dirichlet",
                     "max_effective_lora_update_norm: 0.0 means no clip in the study; read as null",
                     "checkpoint_every: 5 accepted, no effect: every round is committed",
                     "trust_remote_code: False accepted, no effect"):
        assert sum(expected in line for line in lines) == 1, (expected, lines)


def test_a_study_key_and_ours_for_the_same_setting_must_agree(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("algorithm: fedavg\nmethod: svd\n")
    with pytest.raises(ConfigError, match="algorithm='fedavg' and method='svd' disagree"):
        RunConfig.load(path)
    path.write_text("algorithm: fedavg\nmethod: fedavg\ntorch_dtype: bf16\n")
    config = RunConfig.load(path)
    assert config.federation.method == "fedavg" and config.model.dtype == "bfloat16"


def test_keys_this_run_does_not_read_are_named_in_one_line_each(tmp_path, caplog):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: bbc_news\ntext_column: body\nmethod: fedavg\nmu: 0.1\npartitioning: iid\n"
                    "dirichlet_alpha: 0.5\nlora_rank: 4\n")
    with caplog.at_level("INFO", logger="common.config"):
        RunConfig.load(path)
    lines = [record.getMessage() for record in caplog.records]
    assert any("text_column: no effect in this run (the embedded dataset bbc_news" in line for line in lines), lines
    assert any("mu: no effect in this run (read only by subspace_reg's regularizer" in line for line in lines), lines
    path.write_text("method: svd\nmu: 0.1\nalpha: 0.1\nlambda_reg: 0.0\n")
    caplog.clear()
    with caplog.at_level("INFO", logger="common.config"):
        RunConfig.load(path)
    assert [record.getMessage() for record in caplog.records] == [
        "config: mu, alpha, lambda_reg: no effect in this run (read only by subspace_reg's regularizer, and "
        "method is svd)"]
    assert any("dirichlet_alpha: no effect in this run (partitioning is iid)" in line for line in lines), lines
    assert not any(line.startswith("config: lora_rank") for line in lines)    # read: nothing to say
