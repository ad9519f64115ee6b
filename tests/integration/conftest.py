"""Start a real coordinator and real client processes on loopback (port 0), and stop them whatever happens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.harness import Federation


def tiny_run_config(model_dir: str, **overrides) -> dict:
    config = {
        "model_name": model_dir, "lora_rank": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value", "dense"],
        "dataset": "bbc_news", "num_clients": 3, "dirichlet_alpha": 0.3, "min_client_size": 8,
        "max_train_samples": 240, "max_eval_samples": 40, "max_length": 32,
        "per_device_train_batch_size": 8, "max_local_steps": 3, "learning_rate": 5e-3,
        "client_fraction": 1.0, "num_rounds": 2, "seed": 7, "round_timeout_s": 240,
        "save_client_updates": True,
    }
    config.update(overrides)
    return config


@dataclass
class FederationRun:
    run_dir: Path
    received_dirs: list[Path]
    coordinator_log: str
    client_logs: list[str]
    client_codes: list[int]


def run_federation(workdir: Path, config: dict, num_clients: int = 3, timeout_s: float = 420) -> FederationRun:
    """Start a coordinator and num_clients clients, wait for the run to end, return what it left."""
    with Federation(workdir, config) as federation:
        federation.start_coordinator()
        address = federation.wait_address()
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        received = [workdir / f"received-{i}" for i in range(num_clients)]
        for i in range(num_clients):
            federation.start_client(i, "--save-received", str(received[i]))
        code = federation.finish(timeout_s)
        assert code == 0, federation.log("coordinator.log")[-5000:]
        return FederationRun(federation.run_dir, received, federation.log("coordinator.log"),
                             [federation.log(f"client-{i}.log") for i in range(num_clients)],
                             [federation.clients[i].returncode for i in range(num_clients)])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from common.tiny_models import create_tiny_bert

    return create_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), num_labels=5, seed=0)
