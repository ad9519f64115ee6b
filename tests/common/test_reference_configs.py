"""The reference study's configurations (docs/DESIGN.md §6) load, validate and hold its values."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

SHARED = {
    "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.05, "gradient_checkpointing": True,
    "task": "multiple_choice", "dataset": "Rowan/hellaswag", "partition_field": "activity_label",
    "partitioning": "dirichlet", "num_clients": 10, "client_fraction": 0.3, "num_rounds": 20, "local_epochs": 1,
    "dirichlet_alpha": 0.3, "min_client_size": 8, "max_train_samples": 8000, "max_eval_samples": 1000,
    "max_length": 256, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
    "mu": 0.05, "alpha": 0.01, "lambda_reg": 1e-5, "seed": 42,
}
REFERENCE = {
    "roberta_large_hellaswag.yaml": {
        **SHARED, "model_name": "FacebookAI/roberta-large", "dtype": "float32", "load_in_4bit": False,
        "target_modules": ["query", "key", "value", "dense"], "max_local_steps": 30, "learning_rate": 1e-4,
        "max_grad_norm": 0.5, "max_effective_lora_update_norm": 15.0, "train_head": True,
    },
    "smollm_360m_hellaswag.yaml": {
        **SHARED, "model_name": "HuggingFaceTB/SmolLM-360M", "model_type": "causal", "dtype": "float16",
        "load_in_4bit": True,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "max_local_steps": 40, "learning_rate": 2e-4, "max_grad_norm": 1.0, "max_effective_lora_update_norm": 25.0,
    },
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_config_holds_the_study_values(name: str) -> None:
    flat = RunConfig.load(CONFIGS / name).to_flat()
    expected = REFERENCE[name]
    mismatched = {key: (flat[key], value) for key, value in expected.items() if flat[key] != value}
    assert not mismatched, f"{name}: (got, expected) {mismatched}"


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_config_names_every_study_key_explicitly(name: str) -> None:
    """A user of the study recognizes each key in the file itself, not only through a default."""
    import yaml

    written = yaml.safe_load((CONFIGS / name).read_text())
    assert set(REFERENCE[name]) <= set(written), set(REFERENCE[name]) - set(written)


def test_cpu_defaults_load() -> None:
    minilm = RunConfig.load(CONFIGS / "minilm_bbc.yaml")
    smollm2 = RunConfig.load(CONFIGS / "smollm2_bbc.yaml")
    assert minilm.model.model_name == "minilm" and smollm2.model.model_name == "smollm2"
    assert smollm2.model.target_modules == ["auto"] and smollm2.data.dataset == "bbc_news"


def test_a_misspelt_study_key_names_the_nearest_one(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text((CONFIGS / "roberta_large_hellaswag.yaml").read_text() + "max_effective_lora_norm: 15\n")
    with pytest.raises(ConfigError, match="did you mean 'max_effective_lora_update_norm'"):
        RunConfig.load(path)
