"""A real 2-cell grid: each cell a coordinator and client processes over gRPC (tiny model), then the report."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_a_real_grid_runs_each_cell_as_a_federation_and_reports_it(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base_config": "configs/minilm_bbc.yaml", "methods": ["fedavg", "subspace_reg"], "seeds": [7],
        "models": [{"name": "tiny", "launcher_args": ["--tiny-model"]}],
        "overrides": {"num_rounds": 2, "num_clients": 3, "client_fraction": 0.6, "max_train_samples": 150,
                      "max_eval_samples": 40, "max_local_steps": 2, "max_length": 32},
        "output_root": str(tmp_path / "runs"), "cell_timeout_s": 300,
    }))
    command = [sys.executable, "-m", "experiments", "--grid", str(grid_file)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    out = result.stdout
    assert "[cell 1/2] tiny/fedavg/seed7: running" in out and "[cell 2/2] tiny/subspace_reg/seed7: done in" in out
    assert out.count("    round ") == 4   # the launcher's round lines, passed through
    for method in ("fedavg", "subspace_reg"):
        run_dir = tmp_path / "runs" / "tiny" / method / "seed7"
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
        assert (run_dir / "logs" / "client-2.log").exists() and (run_dir / "launcher.log").exists()
    with open(tmp_path / "runs" / "report" / "summary.csv", newline="") as handle:
        rows = {(r["method"], r["metric"]): r for r in csv.DictReader(handle)}
    overlap = float(rows[("subspace_reg", "basis_overlap")]["mean"])
    assert 0.0 <= overlap <= 1.0 and rows[("fedavg", "final_accuracy")]["n"] == "1"
    assert (tmp_path / "runs" / "report" / "tiny_accuracy.png").stat().st_size > 0

    # Everything finished: a rerun starts no federation.
    again = subprocess.run(command + ["--no-report"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 finished, 0 to run" in again.stdout and "running" not in again.stdout
