"""Start a real coordinator and real client processes on loopback (port 0), and stop them whatever happens."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


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
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run_dir, address_file = workdir / "run", workdir / "coordinator.address"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    processes: list[subprocess.Popen] = []

    def start(args: list[str], log_name: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=open(logs / log_name, "w"),
                                   stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    try:
        coordinator = start(["-m", "server", "--config", str(config_path), "--address", "127.0.0.1:0",
                             "--run-dir", str(run_dir), "--address-file", str(address_file),
                             "--wait-for-clients", "180"], "coordinator.log")
        deadline = time.monotonic() + timeout_s
        while not address_file.exists():
            assert coordinator.poll() is None, (logs / "coordinator.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "coordinator never started listening"
            time.sleep(0.2)
        address = address_file.read_text().strip()
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        received = [workdir / f"received-{i}" for i in range(num_clients)]
        clients = [start(["-m", "client", "--coordinator", address, "--name", f"client-{i}",
                          "--save-received", str(received[i]), "--patience", "60"], f"client-{i}.log")
                   for i in range(num_clients)]
        coordinator.wait(timeout=max(1.0, deadline - time.monotonic()))
        codes = [c.wait(timeout=60) for c in clients]
        coordinator_log = (logs / "coordinator.log").read_text()
        assert coordinator.returncode == 0, coordinator_log[-5000:]
        return FederationRun(run_dir, received, coordinator_log,
                             [(logs / f"client-{i}.log").read_text() for i in range(num_clients)], codes)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from common.tiny_models import create_tiny_bert

    return create_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), num_labels=5, seed=0)
