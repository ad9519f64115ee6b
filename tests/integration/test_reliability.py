"""Faults injected on real processes: killed and stalled clients, lost quorum, coordinator crash and resume,
SIGTERM, an unreachable coordinator."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.conftest import tiny_run_config
from tests.integration.harness import ROOT, Federation, free_port

pytestmark = pytest.mark.integration


def _slow_rounds(model_dir: str, **overrides) -> dict:
    """Rounds long enough (a few seconds) to inject a fault while one is open."""
    settings = {"max_local_steps": 25, "num_rounds": 12, "save_client_updates": False, "min_clients_per_round": 2,
                "heartbeat_timeout_s": 5, "round_timeout_s": 120}
    return tiny_run_config(model_dir, **{**settings, **overrides})


def _participated(metrics: list[dict], name: str, after_round: int) -> list[int]:
    return [m["round"] for m in metrics if m["round"] > after_round and name in m["participants"]]


def test_killed_client_is_dropped_at_once_and_rejoins_under_its_name(tmp_path, tiny_model_dir):
    # Tiny-model rounds take well under a second, less than a client restart: with a fixed short run the
    # run could end before the restarted client is back. So the run is long, and once the restarted client
    # has taken part in a round the test ends it with SIGTERM (a clean stop, tested below).
    with Federation(tmp_path, _slow_rounds(tiny_model_dir, num_rounds=300)) as federation:
        federation.start_coordinator()
        federation.wait_address()
        for i in range(3):
            federation.start_client(i)
        federation.wait_for(lambda: federation.round_opened(2), 240, "round 2", watch=federation.coordinator)
        federation.signal_client(1, signal.SIGKILL)
        federation.clients[1].wait()
        federation.start_client(1)                     # same name: it gets its partition back
        federation.wait_for(lambda: _participated(federation.metrics(), "client-1", after_round=2), 180,
                            "the restarted client to take part in a round", watch=federation.coordinator)
        federation.coordinator.send_signal(signal.SIGTERM)
        assert federation.finish() == 0, federation.log("coordinator.log")[-3000:]
        metrics = federation.metrics()
        assert [m["round"] for m in metrics] == list(range(1, len(metrics) + 1))
        dropped = {d["client"]: d["reason"] for d in metrics[1]["dropped"]}
        # Dropped because its connection closed, not because the deadline passed.
        assert "connection lost" in dropped.get("client-1", ""), metrics[1]
        assert sorted(metrics[1]["participants"]) == ["client-0", "client-2"] and metrics[1]["stragglers"] == []
        assert "client client-1 joined" in federation.log("coordinator.log").split("round 2/")[1]   # rejoined
        assert federation.clients[1].returncode == 0


def test_stalled_client_is_dropped_by_heartbeat_timeout_and_recovers(tmp_path, tiny_model_dir):
    with Federation(tmp_path, _slow_rounds(tiny_model_dir, num_rounds=10)) as federation:
        federation.start_coordinator()
        federation.wait_address()
        for i in range(3):
            federation.start_client(i)
        federation.wait_for(lambda: federation.round_opened(2), 240, "round 2", watch=federation.coordinator)
        federation.signal_client(2, signal.SIGSTOP)    # alive, connected, silent
        federation.wait_for(lambda: "dropped client-2: no heartbeat" in federation.log("coordinator.log"), 120,
                            "the stalled client to be dropped", watch=federation.coordinator)
        federation.signal_client(2, signal.SIGCONT)
        assert federation.finish() == 0, federation.log("coordinator.log")[-3000:]
        metrics = federation.metrics()
        stalled_round = next(m for m in metrics if any(d["client"] == "client-2" for d in m["dropped"]))
        assert "no heartbeat" in stalled_round["dropped"][0]["reason"]
        assert len(stalled_round["participants"]) == 2
        assert _participated(metrics, "client-2", after_round=stalled_round["round"]), "client-2 never came back"


def test_below_quorum_with_stop_policy_ends_the_run_with_a_clear_message(tmp_path, tiny_model_dir):
    config = _slow_rounds(tiny_model_dir, num_rounds=6, min_clients_per_round=3, quorum_policy="stop")
    with Federation(tmp_path, config) as federation:
        federation.start_coordinator()
        federation.wait_address()
        for i in range(3):
            federation.start_client(i)
        federation.wait_for(lambda: federation.round_opened(2), 240, "round 2", watch=federation.coordinator)
        federation.signal_client(0, signal.SIGKILL)
        assert federation.finish() == 1
        summary = federation.summary()
        assert summary["status"] == "quorum_lost" and "below the quorum of 3" in summary["stopped_early"]
        assert "quorum_policy=stop" in summary["stopped_early"]
        committed = len(federation.metrics())
        assert committed >= 1 and (federation.run_dir / "checkpoint" / "latest.json").exists()
        assert "run over" in federation.log("client-1.log")


def _final_adapter(run_dir, rounds: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapters" / f"round_{rounds:03d}" / "adapter_model.safetensors"))


def _uninterrupted_final_adapter(workdir, config: dict, clients: int) -> dict[str, torch.Tensor]:
    """The reference a resumed run must equal bit for bit: the same config, never interrupted."""
    with Federation(workdir, config) as reference:
        reference.start(clients)
        assert reference.finish() == 0
        return _final_adapter(reference.run_dir, config["num_rounds"])


def test_coordinator_kill9_and_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path, tiny_model_dir):
    config = tiny_run_config(tiny_model_dir, num_rounds=5, client_fraction=0.6, max_local_steps=6,
                             save_client_updates=False)
    expected = _uninterrupted_final_adapter(tmp_path / "straight", config, clients=3)

    with Federation(tmp_path / "crashed", config, port=free_port()) as federation:
        federation.start(3)
        federation.wait_for(lambda: len(federation.metrics()) >= 2, 240, "two committed rounds",
                            watch=federation.coordinator)
        federation.coordinator.kill()                  # kill -9: no chance to clean up
        federation.coordinator.wait()
        federation.start_coordinator("--resume")       # same port: the clients reconnect by themselves
        assert federation.finish() == 0, federation.log("coordinator.log")[-3000:]
        assert [m["round"] for m in federation.metrics()] == [1, 2, 3, 4, 5]
        assert all(process.returncode == 0 for process in federation.clients.values())
        assert "resuming after committed round" in federation.log("coordinator.log")
        actual = _final_adapter(federation.run_dir, 5)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_sigterm_aborts_the_open_round_and_keeps_the_committed_state(tmp_path, tiny_model_dir):
    with Federation(tmp_path, _slow_rounds(tiny_model_dir, num_rounds=30)) as federation:
        federation.start_coordinator()
        federation.wait_address()
        for i in range(3):
            federation.start_client(i)
        federation.wait_for(lambda: len(federation.metrics()) >= 1, 240, "a committed round",
                            watch=federation.coordinator)
        federation.coordinator.send_signal(signal.SIGTERM)
        assert federation.finish(timeout_s=60) == 0
        summary = federation.summary()
        assert summary["status"] == "stopped" and "stop requested" in summary["stopped_early"]
        committed = load_file(str(federation.run_dir / "checkpoint" / f"round_{summary['rounds_completed']:03d}.safetensors"))
        assert committed and summary["rounds_completed"] == len(federation.metrics())
        for i in range(3):
            assert federation.clients[i].returncode == 0 and "run over" in federation.log(f"client-{i}.log")


def test_client_exits_with_a_clear_message_when_the_coordinator_stays_away():
    result = subprocess.run([sys.executable, "-m", "client", "--coordinator", f"127.0.0.1:{free_port()}",
                             "--patience", "2", "--name", "lonely"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 3
    assert "unreachable" in result.stderr and "patience 2s" in result.stderr


def test_coordinator_kill9_before_the_first_commit_and_resume_keeps_the_same_clients_bit_for_bit(tmp_path, tiny_model_dir):
    # Killed after "round 1/N: sampled", before anything committed: the run id lives in the run directory
    # (run.json), so the same four client processes rejoin the resumed run, train round 1 again and finish.
    config = tiny_run_config(tiny_model_dir, num_clients=4, num_rounds=3, client_fraction=0.5, max_local_steps=30,
                             save_client_updates=False, heartbeat_timeout_s=10)
    expected = _uninterrupted_final_adapter(tmp_path / "straight", config, clients=4)

    with Federation(tmp_path / "crashed", config, port=free_port()) as federation:
        federation.start(4)
        federation.wait_for(lambda: federation.round_opened(1), 240, "round 1 to be sampled",
                            watch=federation.coordinator)
        federation.coordinator.kill()
        federation.coordinator.wait()
        assert federation.metrics() == [] and not (federation.run_dir / "checkpoint" / "latest.json").exists()
        first_pids = {i: p.pid for i, p in federation.clients.items()}
        federation.start_coordinator("--resume")
        assert federation.finish() == 0, federation.log("coordinator.log")[-3000:]
        assert {i: p.pid for i, p in federation.clients.items()} == first_pids      # nobody was restarted
        assert all(p.returncode == 0 for p in federation.clients.values()), [p.returncode for p in federation.clients.values()]
        metrics = federation.metrics()
        assert [m["round"] for m in metrics] == [1, 2, 3] and metrics[0]["attempt"] == 0
        assert all(not m["dropped"] for m in metrics), [m["dropped"] for m in metrics]
        assert any("rejoined run" in federation.log(f"client-{i}.log") for i in range(4))
        actual = _final_adapter(federation.run_dir, 3)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
