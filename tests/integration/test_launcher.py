"""`make smoke`'s launcher: a real local federation with a tiny model, its console output and exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_launcher_runs_a_federation_and_prints_rounds_summary_and_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.local_federation", "--config", "configs/minilm_bbc.yaml", "--tiny-model",
         "--run-dir", str(run_dir), "--timeout", "400", "num_rounds=2", "num_clients=3", "client_fraction=0.6",
         "max_train_samples=150", "max_eval_samples=40", "max_local_steps=2", "method=svd"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=450)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == str(run_dir)
    round_lines = [line for line in lines if line.startswith("round ")]
    assert len(round_lines) == 2 and all("acc " in line and "overlap " in line and " MB" in line for line in round_lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "svd" and summary["rounds_completed"] == 2
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["client-0.log", "client-1.log", "client-2.log",
                                                                   "coordinator.log"]


def test_launcher_rejects_a_bad_override_before_starting_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scripts.local_federation", "--run-dir", str(tmp_path / "r"),
                             "methd=fedavg"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "did you mean 'method'" in result.stderr
    assert not (tmp_path / "r").exists()
