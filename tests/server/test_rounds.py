"""The round state machine: no double counting, drops, quorum retries."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from client.connection import CoordinatorConnection, ReceivedTask
from tests.server.conftest import small_state, start_live_coordinator


def _clients(live, names):
    out = {}
    for i, name in enumerate(names):
        connection = CoordinatorConnection(live.address, patience_s=10)
        out[connection.join(name, i).client_id] = connection
    return out


def _wait_round(live, index: int, attempt: int = 0, polls: int = 1500):
    """Poll until the round is open; give up after ``polls`` x 20 ms (30 s), a bound, not a speed check."""
    for _ in range(polls):
        current = live.coordinator._round
        if current is not None and current.index == index and current.attempt == attempt and current.open:
            return current
        time.sleep(0.02)
    raise AssertionError(f"round {index} (attempt {attempt}) never opened")


def _lines(live):
    path = live.run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _rejection(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def test_unsampled_repeated_and_late_uploads_are_rejected_and_change_nothing(tmp_path):
    # 3 clients, 1 sampled per round, 2 rounds.
    live = start_live_coordinator(tmp_path, small_state(), num_clients=3, client_fraction=0.3, num_rounds=2)
    clients = _clients(live, ["c0", "c1", "c2"])
    try:
        current = _wait_round(live, 1)
        (sampled_id,) = current.sampled
        other_id = next(cid for cid in clients if cid != sampled_id)
        task = clients[sampled_id].next_task(sampled_id)
        assert isinstance(task, ReceivedTask)

        error = _rejection(lambda: clients[other_id].submit(other_id, 1, 10, task.tensors, 0.1, 1.0, 1))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "was not sampled in round 1" in error.details()
        assert current.updates == {}

        assert clients[sampled_id].submit(sampled_id, 1, 10, task.tensors, 0.1, 1.0, 1).bytes_received > 0
        error = _rejection(lambda: clients[sampled_id].submit(sampled_id, 1, 10, task.tensors, 0.1, 1.0, 1))
        assert error.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)

        second = _wait_round(live, 2)                     # round 1 committed: a late upload for it is refused
        error = _rejection(lambda: clients[sampled_id].submit(sampled_id, 1, 10, task.tensors, 0.1, 1.0, 1))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "the open round is 2" in error.details()
        assert second.updates == {}
    finally:
        for connection in clients.values():
            connection.close()
        live.stop()
    lines = _lines(live)
    assert [line["round"] for line in lines] == [1]
    assert lines[0]["participants"] == [live.coordinator.registry.find(sampled_id).name]


def test_below_quorum_retries_with_a_fresh_sample_of_connected_clients(tmp_path):
    # 3 clients, 2 sampled, quorum 2. One sampled client's keep-alive closes: the round is retried.
    live = start_live_coordinator(tmp_path, small_state(), num_clients=3, client_fraction=0.6, num_rounds=1,
                                  min_clients_per_round=2, quorum_policy="retry")
    clients = _clients(live, ["c0", "c1", "c2"])
    try:
        first = _wait_round(live, 1)
        for cid in clients:                       # every session's keep-alive is open: all are live
            live.coordinator.keepalive(cid, is_open=True)
        lost, kept = list(first.sampled)
        live.coordinator.keepalive(lost, is_open=False)
        task = clients[kept].next_task(kept)
        assert clients[kept].submit(kept, 1, 10, task.tensors, 0.1, 1.0, 1).bytes_received > 0

        retry = _wait_round(live, 1, attempt=1)
        assert lost not in retry.sampled and len(retry.sampled) == 2
        for cid in retry.sampled:
            task = clients[cid].next_task(cid)
            assert clients[cid].submit(cid, 1, 10, task.tensors, 0.1, 1.0, 1).bytes_received > 0
        live.driver.join(timeout=30)
    finally:
        for connection in clients.values():
            connection.close()
        live.stop()
    (line,) = _lines(live)
    assert line["attempt"] == 1 and len(line["participants"]) == 2
    (event,) = [json.loads(e) for e in (live.run_dir / "events.jsonl").read_text().splitlines()]
    assert event["event"] == "round_below_quorum" and event["reported"] == 1 and event["quorum"] == 2
    assert list(event["dropped"].values()) == ["connection lost (keep-alive stream closed)"]


def test_a_straggler_past_the_deadline_is_dropped_and_listed(tmp_path):
    # Quorum 1 of 2; the second client is alive (heartbeats) but never uploads.
    live = start_live_coordinator(tmp_path, small_state(), num_clients=2, num_rounds=1, round_timeout_s=2,
                                  min_clients_per_round=1, heartbeat_timeout_s=600)
    clients = _clients(live, ["fast", "slow"])
    try:
        _wait_round(live, 1)
        fast = next(cid for cid, c in clients.items() if live.coordinator.registry.find(cid).name == "fast")
        task = clients[fast].next_task(fast)
        assert clients[fast].submit(fast, 1, 10, task.tensors, 0.1, 1.0, 1).bytes_received > 0
        live.driver.join(timeout=30)
    finally:
        for connection in clients.values():
            connection.close()
        live.stop()
    (line,) = _lines(live)
    assert line["participants"] == ["fast"] and line["stragglers"] == ["slow"]
    assert line["dropped"] == [{"client": "slow", "reason": "missed the round deadline (2s)"}]


def test_run_directory_is_never_overwritten_and_resume_refuses_a_changed_config(tmp_path):
    import subprocess
    import sys

    from tests.server.conftest import ROOT

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "latest.json").write_text("{}")
    (run_dir / "config.yaml").write_text("method: fedavg\nnum_rounds: 5\n")
    refused = subprocess.run([sys.executable, "-m", "server", "--run-dir", str(run_dir), "--address", "127.0.0.1:0"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "already holds a run; pass --resume" in refused.stderr
    changed = subprocess.run([sys.executable, "-m", "server", "--run-dir", str(run_dir), "--address", "127.0.0.1:0",
                              "--resume", "method=svd"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "--resume with a different config" in changed.stderr
    assert "method" in changed.stderr
