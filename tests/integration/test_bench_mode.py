"""The benchmark-only mode (synthetic_layout + python -m client --bench-echo) runs real rounds: a real
coordinator and 3 real client processes on loopback move real bytes and change the global adapter, so
bench/round_overhead.py and bench/scale.py cannot silently measure nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.synthetic import payload_bytes, synthetic_adapter
from tests.integration.harness import Federation

pytestmark = pytest.mark.integration

LAYOUT = "encoder:2x64x256"
RANK = 4


def bench_config(method: str, **overrides) -> dict:
    config = {"model_name": "none", "synthetic_layout": LAYOUT, "lora_rank": RANK, "lora_alpha": 8,
              "method": method, "num_clients": 3, "client_fraction": 1.0, "num_rounds": 2, "seed": 5,
              "round_timeout_s": 120, "heartbeat_timeout_s": 10}
    config.update(overrides)
    return config


@pytest.fixture(scope="module", params=["fedavg", "subspace_reg"])
def bench_run(request, tmp_path_factory):
    method = request.param
    config = bench_config(method)
    with Federation(tmp_path_factory.mktemp(f"bench-{method}"), config) as federation:
        federation.start(clients=0)
        for i in range(3):
            federation.start_client(i, "--bench-echo")
        code = federation.finish(timeout_s=240)
        logs = [federation.log(f"client-{i}.log") for i in range(3)]
        assert code == 0, federation.log("coordinator.log")[-4000:]
        assert [federation.clients[i].returncode for i in range(3)] == [0, 0, 0], logs
        return method, config, federation.run_dir, federation.log("coordinator.log"), logs


def test_two_rounds_move_bytes_both_ways(bench_run):
    method, _, run_dir, _, _ = bench_run
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    upload = payload_bytes(LAYOUT, RANK)                    # every client uploads A and B of every layer
    for line in lines:
        assert line["method"] == method and line["accuracy"] is None      # evaluation is skipped
        assert sorted(line["participants"]) == ["client-0", "client-1", "client-2"]
        assert line["bytes_up"] == 3 * upload
        assert line["bytes_down"] >= 3 * upload            # subspace_reg: U, g and A_g from round 2 on
        assert line["num_examples"] == [100, 100, 100]
    assert json.loads((run_dir / "summary.json").read_text())["rounds_completed"] == 2


def test_the_global_adapter_changes_every_round(bench_run):
    _, config, run_dir, _, _ = bench_run
    initial = synthetic_adapter(LAYOUT, RANK, config["seed"])
    rounds = [load_file(str(run_dir / "adapters" / f"round_{r:03d}" / "adapter_model.safetensors")) for r in (1, 2)]
    for before, after in [(initial, rounds[0]), (rounds[0], rounds[1])]:
        assert before.keys() == after.keys()
        for name in before:
            assert torch.isfinite(after[name]).all()
            assert not torch.equal(before[name], after[name]), name
    checkpoint = load_file(str(next((run_dir / "checkpoint").glob("round_002.safetensors"))))
    assert all(torch.equal(checkpoint[name], rounds[1][name]) for name in initial)


def test_clients_load_no_model(bench_run):
    _, _, _, coordinator_log, client_logs = bench_run
    assert "no model, no evaluation" in coordinator_log
    for log in client_logs:
        assert "loading model" not in log.lower() and "partition 0:" not in log


def test_a_real_client_refuses_a_benchmark_run(tmp_path):
    with Federation(tmp_path, bench_config("fedavg", num_clients=1)) as federation:
        federation.start(clients=1)
        federation.wait_for(lambda: federation.clients[0].poll() is not None, 120, "the client to stop")
        assert federation.clients[0].returncode == 2
        assert "start this client with --bench-echo" in federation.log("client-0.log")
