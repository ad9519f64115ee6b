"""Across hosts: the coordinator and 3 clients in separate network namespaces joined by veth pairs.

One client's link is cut mid-round (``ip link set ... down``): the round completes with the quorum and
nothing hangs; the link comes back and the client takes part again. Needs root and iproute2; the
namespaces and links this test creates are removed afterwards, whatever the outcome.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.integration.conftest import tiny_run_config
from tests.integration.harness import Federation

pytestmark = pytest.mark.integration
SUBNET = "10.231"          # addresses exist only inside the namespaces this test creates


def _ip(*args: str, namespace: str | None = None) -> None:
    command = ["ip", "netns", "exec", namespace, "ip", *args] if namespace else ["ip", *args]
    subprocess.run(command, check=True, capture_output=True, timeout=30)


class Hosts:
    """A coordinator namespace with one veth link to each client namespace."""

    def __init__(self, num_clients: int) -> None:
        tag = f"sfl{os.getpid() % 100000}"
        self.coordinator = f"{tag}-coord"
        self.clients = [f"{tag}-c{i}" for i in range(num_clients)]
        self.links = [f"{tag}c{i}" for i in range(num_clients)]      # coordinator-side ends (<= 15 chars)

    def create(self) -> None:
        for namespace in [self.coordinator, *self.clients]:
            _ip("netns", "add", namespace)
            _ip("link", "set", "lo", "up", namespace=namespace)
        for i, (namespace, link) in enumerate(zip(self.clients, self.links)):
            peer = f"{link}p"
            _ip("link", "add", link, "netns", self.coordinator, "type", "veth", "peer", "name", peer, "netns", namespace)
            _ip("addr", "add", f"{SUBNET}.{i}.1/24", "dev", link, namespace=self.coordinator)
            _ip("addr", "add", f"{SUBNET}.{i}.2/24", "dev", peer, namespace=namespace)
            _ip("link", "set", link, "up", namespace=self.coordinator)
            _ip("link", "set", peer, "up", namespace=namespace)

    def set_link(self, client: int, up: bool) -> None:
        _ip("link", "set", self.links[client], "up" if up else "down", namespace=self.coordinator)

    def remove(self) -> None:
        for namespace in [self.coordinator, *self.clients]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)

    def namespace_of(self, role: str) -> str:
        return self.coordinator if role == "coordinator" else self.clients[int(role.split("-")[1])]


@pytest.fixture
def hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    topology = Hosts(num_clients=3)
    try:
        topology.create()
    except subprocess.CalledProcessError as error:
        topology.remove()
        pytest.skip(f"cannot create network namespaces here: {error.stderr.decode(errors='replace').strip()}")
    yield topology
    topology.remove()


def test_cut_link_drops_the_client_the_round_completes_and_it_comes_back(tmp_path, tiny_model_dir, hosts):
    config = tiny_run_config(tiny_model_dir, num_rounds=10, max_local_steps=25, min_clients_per_round=2,
                             heartbeat_timeout_s=5, round_timeout_s=120, save_client_updates=False)
    wrap = lambda role, command: ["ip", "netns", "exec", hosts.namespace_of(role), *command]  # noqa: E731
    with Federation(tmp_path, config, host="0.0.0.0", wrap=wrap) as federation:
        federation.start_coordinator()
        port = federation.wait_address().rsplit(":", 1)[1]
        for i in range(3):
            federation.start_client(i, address=f"{SUBNET}.{i}.1:{port}")
        federation.wait_for(lambda: federation.round_opened(2), 240, "round 2", watch=federation.coordinator)
        hosts.set_link(1, up=False)
        federation.wait_for(lambda: "dropped client-1" in federation.log("coordinator.log"), 120,
                            "the cut-off client to be dropped", watch=federation.coordinator)
        cut_round = max(m["round"] for m in federation.metrics()) + 1 if federation.metrics() else 1
        hosts.set_link(1, up=True)
        assert federation.finish(timeout_s=400) == 0, federation.log("coordinator.log")[-3000:]
        metrics = federation.metrics()
        assert [m["round"] for m in metrics] == list(range(1, 11))
        dropped_round = next(m for m in metrics if any(d["client"] == "client-1" for d in m["dropped"]))
        assert dropped_round["round"] >= cut_round - 1
        assert sorted(dropped_round["participants"]) == ["client-0", "client-2"]
        back = [m["round"] for m in metrics if m["round"] > dropped_round["round"] and "client-1" in m["participants"]]
        assert back, "client-1 never took part again after its link came back"
