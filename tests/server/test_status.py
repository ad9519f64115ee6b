"""The operator's view: the Status RPC and `python -m server status`, against a live coordinator on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client.connection import ClientSecurity, CoordinatorConnection, ReceivedTask
from server.__main__ import main as server_main
from server.registry import ClientRecord
from server.rounds import RoundState
from server.security import SecurityConfig
from server.status import ClientStatus, RunStatus, client_state, eta_seconds, format_status
from tests.server.conftest import small_state, start_live_coordinator
from tests.server.test_rounds import _wait_round

TOKEN = "s3cret"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _status(live, capsys, *extra: str) -> dict:
    code = server_main(["status", "--coordinator", live.address, "--json", "--allow-insecure-token", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_status_follows_a_run_round_by_round(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SUBSPACEFL_TOKEN", TOKEN)
    live = start_live_coordinator(tmp_path, small_state(), num_clients=3, client_fraction=0.3, num_rounds=2,
                                  security=SecurityConfig(token=TOKEN))
    connections = {}
    try:
        for index, name in enumerate(["c0", "c1", "c2"]):
            connection = CoordinatorConnection(live.address, patience_s=10, security=ClientSecurity(token=TOKEN))
            connections[connection.join(name, index).client_id] = connection
        first = _wait_round(live, 1)
        (sampled_id,) = first.sampled
        sampled_name = first.names[sampled_id]
        status = _status(live, capsys)
        assert (status["run_id"], status["method"], status["round"], status["num_rounds"]) == ("test-run", "fedavg", 1, 2)
        assert status["phase"] == "training" and status["rounds_completed"] == 0 and status["eta_seconds"] == -1
        states = {c["name"]: c["state"] for c in status["clients"]}
        assert states == {name: "training" if name == sampled_name else "joined" for name in ("c0", "c1", "c2")}
        assert [c["partition"] for c in status["clients"]] == [0, 1, 2]
        assert {c["num_examples"] for c in status["clients"]} == {10}
        assert all(c["seconds_since_keepalive"] >= 0 for c in status["clients"])      # seen (-1: never)

        task = connections[sampled_id].next_task(sampled_id)
        assert isinstance(task, ReceivedTask)
        connections[sampled_id].submit(sampled_id, 1, 10, task.tensors, 0.1, 1.0, 1)
        _wait_round(live, 2)
        status = _status(live, capsys)
        assert status["round"] == 2 and status["rounds_completed"] == 1 and status["eta_seconds"] >= 0
        rounds = {c["name"]: c["rounds_participated"] for c in status["clients"]}
        assert rounds == {name: int(name == sampled_name) for name in ("c0", "c1", "c2")}

        # The human view says the same in a table.
        assert server_main(["status", "--coordinator", live.address, "--allow-insecure-token"]) == 0
        table = capsys.readouterr().out
        assert "method fedavg" in table and "round 2/2 (1 committed), phase training" in table
        assert "client" in table and "keep-alive" in table and sampled_name in table

        # Piped into a reader that is already gone (`| head`): exit 0 and nothing on stderr, no traceback.
        command = [sys.executable, "-m", "server", "status", "--coordinator", live.address, "--json",
                   "--allow-insecure-token"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
        process.stdout.close()      # before the child has printed anything: its write finds no reader
        _, err = process.communicate(timeout=120)
        assert (process.returncode, err.decode()) == (0, "")

        # Same authentication as every other call: a wrong token gets no status.
        monkeypatch.setenv("SUBSPACEFL_TOKEN", "wrong")
        assert server_main(["status", "--coordinator", live.address, "--allow-insecure-token"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
    finally:
        for connection in connections.values():
            connection.close()
        live.stop()


def test_status_of_an_unreachable_coordinator_is_one_clear_line(capsys):
    from tests.integration.harness import free_port

    code = server_main(["status", "--coordinator", f"127.0.0.1:{free_port()}", "--timeout", "2"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: no status from 127.0.0.1:") and err.count("\n") == 1
    assert server_main(["status", "--coordinator", "127.0.0.1:1", "--tls-cert", "x.pem"]) == 2
    assert "--tls-cert and --tls-key go together" in capsys.readouterr().err


def _record(name: str, client_id: str, **fields) -> ClientRecord:
    return ClientRecord(client_id=client_id, name=name, partition=0, device="cpu", **fields)


@pytest.mark.parametrize("record, expected", [
    (_record("a", "id-a"), ("training", "")),
    (_record("b", "id-b"), ("uploaded", "")),
    (_record("c", "id-c"), ("dropped", "connection lost")),
    (_record("d", "id-d"), ("joined", "")),
    (_record("e", "id-e", keepalive_lost=True), ("gone", "connection lost (keep-alive stream closed)")),
    (_record("f", ""), ("gone", "has not rejoined since the coordinator restarted")),
])
def test_each_client_state_follows_the_open_round_and_the_connection(record, expected):
    current = RoundState(index=3, sampled={"id-a": 0, "id-b": 1, "id-c": 2}, names={})
    current.updates["id-b"] = (None, None)
    current.dropped["id-c"] = "connection lost"
    assert client_state(record, current) == expected


def test_eta_is_the_mean_round_times_the_rounds_left_and_unknown_before_the_first():
    assert eta_seconds([], 5, 0.0) == -1.0
    assert eta_seconds([10.0, 20.0], 4, 5.0) == pytest.approx(55.0)     # 15 s x 4 rounds, 5 s of it done
    assert eta_seconds([10.0], 0, 3.0) == 0.0


def test_the_table_lists_every_client_with_its_reason():
    status = RunStatus(run_id="r1", method="subspace_reg", round=4, num_rounds=20, rounds_completed=3,
                       phase="training", elapsed_seconds=3725.0, eta_seconds=-1.0, clients=[
                           ClientStatus("site-a", "dropped", "no heartbeat for 31s", 2.5, 3, 0, 120, 8),
                           ClientStatus("site-b", "gone", "", -1.0, 0, 1, 80, 4)])
    text = format_status(status)
    assert "round 4/20 (3 committed), phase training, elapsed 1h02m05s, ETA unknown" in text
    assert "site-a  dropped (no heartbeat for 31s)  2.5s ago" in text
    assert "site-b  gone" in text and text.splitlines()[-1].split()[-1] == "4"
