"""A real Coordinator behind a real gRPC server on loopback, with a stand-in model (no transformer needed)."""

from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from server.app import start_grpc_server
from server.coordinator import Coordinator
from server.outputs import RunDirectory
from server.security import SecurityConfig

ROOT = Path(__file__).resolve().parents[2]


class StandInModel:
    """Evaluation and saving without a transformer: records what it was given."""

    def __init__(self) -> None:
        self.evaluated: list[dict[str, torch.Tensor]] = []
        self.base_increments: list[dict] = []

    def evaluate(self, tensors):
        self.evaluated.append(tensors)
        return {"accuracy": 0.5, "loss": 1.0, "num_examples": 1}

    def save(self, tensors, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adapter_model.safetensors").write_bytes(b"")

    def add_to_base(self, increment):
        self.base_increments.append(increment)


def small_state(d: int = 12, k: int = 10, r: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "layer.lora_A.weight": torch.randn(r, k, generator=g),
        "layer.lora_B.weight": torch.zeros(d, r),
        "classifier.weight": torch.randn(3, 4, generator=g),
    }


@dataclass
class LiveCoordinator:
    coordinator: Coordinator
    address: str
    model: StandInModel
    run_dir: Path
    driver: threading.Thread
    server: object

    def stop(self) -> None:
        self.coordinator.request_stop()
        self.server.stop(0).wait()
        self.driver.join(timeout=10)


def start_live_coordinator(run_dir: Path, state: dict[str, torch.Tensor], num_clients: int = 1,
                           security: SecurityConfig = SecurityConfig(), **overrides) -> LiveCoordinator:
    ranks = [t.shape[0] for name, t in state.items() if name.endswith(".lora_A.weight")]
    defaults = {"lora_rank": max(ranks)} if ranks else {}     # a real run's adapter has the config's rank
    config = RunConfig.from_flat({"num_clients": num_clients, "client_fraction": 1.0, "num_rounds": 1,
                                  "method": "fedavg", "round_timeout_s": 60, "max_update_norm": 1e3,
                                  **defaults, **overrides})
    model = StandInModel()
    coordinator = Coordinator(config, RunDirectory(run_dir), model, state, partition_sizes=[10] * num_clients,
                              poll_timeout_s=2.0, run_id="test-run")
    server, _health, port = start_grpc_server(coordinator, ["fingerprint"] * num_clients, "127.0.0.1:0", security)
    driver = threading.Thread(target=lambda: coordinator.run(wait_for_clients_s=60), daemon=True)
    driver.start()
    return LiveCoordinator(coordinator, f"127.0.0.1:{port}", model, run_dir, driver, server)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory) -> Path:
    """A development CA with server and client certificates (scripts/make_certs.sh), plus a foreign CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out / "ours"), "localhost,127.0.0.1", "1"],
                   check=True, capture_output=True)
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out / "foreign"), "localhost,127.0.0.1", "1"],
                   check=True, capture_output=True)
    return out
