"""One client as a torchrun job of 2 CPU ranks (gloo, on 127.0.0.1) in real federations: it uploads what one
process uploads at twice the batch, and a rank killed mid-round takes the whole client down, the coordinator
drops it, and the same command brings it back under its name and partition."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.client.equivalence import assert_same_training
from tests.integration.conftest import tiny_run_config
from tests.integration.harness import Federation, descendants

pytestmark = pytest.mark.integration

PER_RANK_BATCH = 4


def _no_dropout_copy(tiny_model_dir: str, target: Path) -> str:
    """Dropout masks are drawn per rank: only without dropout do 2 ranks compute what one process computes."""
    shutil.copytree(tiny_model_dir, target)
    config = json.loads((target / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (target / "config.json").write_text(json.dumps(config))
    return str(target)


@contextlib.contextmanager
def _against_one_process(tmp_path, tiny_model_dir, start_distributed):
    """One round of one client holding all 240 rows (3 full global batches of 8, subspace_reg's penalty):
    once as one process at batch 8, once as ``start_distributed(federation)`` starts it at batch 4 per rank.
    Both runs have finished and uploaded the same factors when the body runs; yields the two federations."""
    model = _no_dropout_copy(tiny_model_dir, tmp_path / "model")
    settings = {"num_clients": 1, "num_rounds": 1, "max_local_steps": 3, "method": "subspace_reg"}
    one_process = tiny_run_config(model, per_device_train_batch_size=2 * PER_RANK_BATCH, **settings)
    distributed = tiny_run_config(model, per_device_train_batch_size=PER_RANK_BATCH, **settings)
    with Federation(tmp_path / "one", one_process) as one, Federation(tmp_path / "two", distributed) as two:
        for federation in (one, two):
            federation.start_coordinator()
        for federation in (one, two):
            federation.wait_address()
        one.start_client(0)
        start_distributed(two)
        assert one.finish(300) == 0, one.log("coordinator.log")[-3000:]
        assert two.finish(300) == 0, two.log("coordinator.log")[-3000:] + two.log("client-0.log")[-5000:]
        solo = load_file(one.run_dir / "updates" / "round_001" / "client-0.safetensors")
        ranks = load_file(two.run_dir / "updates" / "round_001" / "client-0.safetensors")
        assert_same_training(ranks, solo, lr=distributed["learning_rate"])
        yield one, two


def test_two_ranks_at_batch_b_upload_what_one_process_uploads_at_batch_2b(tmp_path, tiny_model_dir):
    with _against_one_process(tmp_path, tiny_model_dir, lambda two: two.start_torchrun_client(0, nproc=2)) \
            as (one, two):
        assert two.clients[0].returncode == 0, two.log("client-0.log")[-5000:]   # torchrun: every rank exited 0
        log = two.log("client-0.log")
        assert "[client-0 rank 1/2]" in log and "run over (rank 0 says)" in log
        assert log.count("uploaded") == 1                                          # rank 0 alone uploads
        (solo_round,), (ranks_round,) = one.metrics(), two.metrics()
        # The whole partition counts, once; steps are global batches; the loss is the global batches'.
        assert ranks_round["num_examples"] == solo_round["num_examples"] == [240]
        assert ranks_round["local_steps"] == solo_round["local_steps"] == {"client-0": 3}
        assert ranks_round["train_loss"] == pytest.approx(solo_round["train_loss"], rel=1e-5)


def _start_two_node_client(federation: Federation, index: int) -> list:
    """Client ``index`` as one torchrun job over two "machines": two torchrun agents (--nnodes 2, one rank
    each) that meet through torchrun's own c10d rendezvous, as two hosts would; here both on 127.0.0.1,
    node 0 hosting the rendezvous store. ``clients[index]`` is node 0's agent."""
    from tests.integration.harness import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    agents = []
    for node in (0, 1):
        agents.append(federation._start(f"client-{index}", [
            "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"two-nodes-{index}",
            "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", "127.0.0.1",
            "-m", "client", "--coordinator", federation.client_address(), "--name", f"client-{index}",
            "--patience", "90"], f"client-{index}-node{node}.log", env={**federation.env, "GLOO_SOCKET_IFNAME": "lo"}))
    federation.clients[index] = agents[0]
    return agents


def test_a_client_spanning_two_nodes_uploads_what_one_process_uploads(tmp_path, tiny_model_dir):
    # torchrun --nnodes 2: one client whose ranks live under two agents (two machines in real use).
    agents = []
    with _against_one_process(tmp_path, tiny_model_dir, lambda two: agents.extend(_start_two_node_client(two, 0))) \
            as (one, two):
        node0, node1 = two.log("client-0-node0.log"), two.log("client-0-node1.log")
        for agent in agents:
            assert agent.wait(timeout=60) == 0, node0[-3000:] + node1[-3000:]
        assert "[client-0 rank 1/2]" in node1 and "uploaded" in node0 and "uploaded" not in node1
        assert two.metrics()[0]["num_examples"] == one.metrics()[0]["num_examples"] == [240]


# --------------------------------------------------------------------------- faults


def _rank_pids(agent_pid: int) -> dict[int, int]:
    """RANK -> pid of the ranks under a torchrun agent (from their environment, /proc)."""
    ranks = {}
    for pid in descendants(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"                    # a zombie has exited: only its parent has not read its status yet


@pytest.mark.parametrize("killed_rank", [1, 0])
def test_a_rank_killed_mid_round_takes_the_client_down_and_the_same_command_rejoins(tmp_path, tiny_model_dir,
                                                                                    killed_rank):
    # client-0 is a 2-rank torchrun job, client-1 a plain process that keeps the run going meanwhile.
    # Rounds of 40 local steps last a few seconds here, long enough to be killed in.
    config = tiny_run_config(tiny_model_dir, num_clients=2, num_rounds=300, max_local_steps=40,
                             per_device_train_batch_size=PER_RANK_BATCH, min_clients_per_round=1,
                             save_client_updates=False, heartbeat_timeout_s=5, round_timeout_s=120)
    with Federation(tmp_path, config) as federation:
        federation.start_coordinator()
        federation.wait_address()
        agent = federation.start_torchrun_client(0, nproc=2)
        federation.start_client(1)
        federation.wait_for(lambda: re.search(r"as partition \d+", federation.log("client-0.log")), 240,
                            "the torchrun client to join", watch=federation.coordinator)
        partition = re.search(r"as partition (\d+)", federation.log("client-0.log")).group(1)
        training = re.compile(r"round (\d+): received .* training")
        federation.wait_for(lambda: training.search(federation.log("client-0.log")), 240,
                            "client-0 to train a round", watch=federation.coordinator)
        ranks = _rank_pids(agent.pid)
        assert sorted(ranks) == [0, 1], ranks
        killed_in = int(training.findall(federation.log("client-0.log"))[-1])
        os.kill(ranks[killed_rank], signal.SIGKILL)

        # The whole job goes down: torchrun's agent stops the other rank and exits, within a bounded time.
        federation.wait_for(lambda: agent.poll() is not None and not any(map(_alive, ranks.values())), 60,
                            "every process of the torchrun client to exit", watch=federation.coordinator)
        assert agent.returncode != 0
        # The coordinator drops it, as any dead client: its connection closed (or, at worst, its heartbeats).
        federation.wait_for(lambda: "dropped client-0" in federation.log("coordinator.log"), 60,
                            "the coordinator to drop client-0", watch=federation.coordinator)

        # The same command: the same name, the same partition, and it trains again.
        before = federation.log("client-0.log")
        federation.start_torchrun_client(0, nproc=2)
        rejoined = lambda: federation.log("client-0.log")[len(before):]      # noqa: E731
        federation.wait_for(lambda: f"as partition {partition} " in rejoined(), 240,
                            "the restarted client to rejoin", watch=federation.coordinator)
        federation.wait_for(lambda: any(m["round"] > killed_in and "client-0" in m["participants"]
                                        for m in federation.metrics()), 240,
                            "the restarted client to take part in a round", watch=federation.coordinator)
        federation.coordinator.send_signal(signal.SIGTERM)
        assert federation.finish() == 0, federation.log("coordinator.log")[-3000:]
        dropped = [d for m in federation.metrics() for d in m["dropped"] if d["client"] == "client-0"]
        assert dropped, [m["dropped"] for m in federation.metrics()]
        assert federation.clients[0].returncode == 0, rejoined()[-3000:]


def _long_run(tiny_model_dir: str, **overrides) -> dict:
    """A torchrun client and a plain one over many long rounds, any one of them enough for a round: a fault
    can be injected mid-round and the run goes on (or is stopped by the test)."""
    return tiny_run_config(tiny_model_dir, num_clients=2, num_rounds=300, max_local_steps=100,
                           per_device_train_batch_size=PER_RANK_BATCH, min_clients_per_round=1,
                           save_client_updates=False, **overrides)


def test_rank_zero_keeps_beating_while_it_waits_in_a_collective(tmp_path, tiny_model_dir):
    # Rank 1 stopped (SIGSTOP) for 3 heartbeat timeouts mid-round: rank 0 sits in DDP's all-reduce, waiting
    # for it, and its keep-alive thread must go on beating, or the coordinator would drop the client.
    config = _long_run(tiny_model_dir, heartbeat_timeout_s=4, round_timeout_s=120)
    with Federation(tmp_path, config) as federation:
        federation.start_coordinator()
        federation.wait_address()
        agent = federation.start_torchrun_client(0, nproc=2)
        federation.start_client(1)
        training = re.compile(r"round (\d+): received .* training")
        federation.wait_for(lambda: training.search(federation.log("client-0.log")), 240,
                            "client-0 to train a round", watch=federation.coordinator)
        stalled_in = int(training.findall(federation.log("client-0.log"))[-1])
        rank1 = _rank_pids(agent.pid)[1]
        os.kill(rank1, signal.SIGSTOP)
        try:
            time.sleep(12)
        finally:
            os.kill(rank1, signal.SIGCONT)
        federation.wait_for(lambda: any(m["round"] >= stalled_in and "client-0" in m["participants"]
                                        for m in federation.metrics()), 240,
                            "client-0 to finish the stalled round", watch=federation.coordinator)
        federation.coordinator.send_signal(signal.SIGTERM)
        assert federation.finish() == 0, federation.log("coordinator.log")[-3000:]
        assert "dropped client-0" not in federation.log("coordinator.log"), federation.log("coordinator.log")[-3000:]
        assert agent.returncode == 0, federation.log("client-0.log")[-3000:]


def test_a_hung_rank_ends_the_client_after_the_collective_timeout(tmp_path, tiny_model_dir):
    # Rank 1 stopped for good mid-round: rank 0's all-reduce gives up after --dist-timeout (8 s here), rank 0
    # exits, and torchrun's agent takes the job down (SIGTERM, then SIGKILL for the stopped rank after its
    # 30 s grace), instead of rank 0 waiting forever while its heartbeats keep the client alive.
    config = _long_run(tiny_model_dir, heartbeat_timeout_s=5, round_timeout_s=300)
    with Federation(tmp_path, config) as federation:
        federation.start_coordinator()
        federation.wait_address()
        agent = federation.start_torchrun_client(0, 2, "--dist-timeout", "8")
        federation.start_client(1)
        federation.wait_for(lambda: re.search(r"round \d+: received .* training", federation.log("client-0.log")),
                            240, "client-0 to train a round", watch=federation.coordinator)
        ranks = _rank_pids(agent.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        federation.wait_for(lambda: agent.poll() is not None and not any(map(_alive, ranks.values())), 120,
                            "the torchrun client to end", watch=federation.coordinator)
        assert agent.returncode != 0
        assert re.search(r"[Tt]imed? ?out", federation.log("client-0.log")), federation.log("client-0.log")[-3000:]
        federation.wait_for(lambda: "dropped client-0" in federation.log("coordinator.log"), 60,
                            "the coordinator to drop client-0", watch=federation.coordinator)


def test_ranks_do_not_outlive_a_killed_torchrun_agent(tmp_path):
    # The agent stops its ranks when one fails, but killed outright it cannot: each rank asked Linux to stop
    # it with its parent. Here rank 0 is still retrying its join (nothing listens on the port).
    import subprocess

    from scripts.local_federation import torchrun_command
    from tests.integration.harness import ROOT, free_port

    log = open(tmp_path / "client.log", "w")
    agent = subprocess.Popen([*torchrun_command(2, "orphans"), "-m", "client", "--coordinator",
                              f"127.0.0.1:{free_port()}", "--name", "orphan", "--patience", "120"],
                             cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo"},
                             stdout=log, stderr=subprocess.STDOUT)
    ranks: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while "not reachable" not in (tmp_path / "client.log").read_text():
            if time.monotonic() > deadline or agent.poll() is not None:       # a bound, as harness.wait_for
                raise AssertionError((tmp_path / "client.log").read_text())
            time.sleep(0.2)
        ranks = _rank_pids(agent.pid)
        assert sorted(ranks) == [0, 1], ranks
        agent.kill()
        agent.wait()
        deadline = time.monotonic() + 30
        while any(map(_alive, ranks.values())):
            if time.monotonic() > deadline:
                raise AssertionError(f"ranks {ranks} outlived their agent")
            time.sleep(0.2)
    finally:
        for pid in {*descendants(agent.pid), *ranks.values()}:       # orphans are no longer the agent's
            try:
                if b"orphan" in Path(f"/proc/{pid}/cmdline").read_bytes():  # still ours, not a reused pid
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        if agent.poll() is None:
            agent.kill()
            agent.wait()
