"""Real coordinator and client processes for integration tests, on loopback (or in network namespaces).

Every process a Federation starts is killed when the test ends, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A currently free loopback port (for a coordinator that must come back on the same port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, theirs...), from /proc (Linux)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()    # after "(comm)": state, ppid, ...
        except (OSError, IndexError):
            continue                                               # gone meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class Federation:
    def __init__(self, workdir: Path, config: dict, host: str = "127.0.0.1", port: int = 0,
                 wrap: Callable[[str, list[str]], list[str]] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.run_dir = workdir / "run"
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.host, self.port = host, port
        self.wrap = wrap or (lambda _role, command: command)   # e.g. prefix with `ip netns exec NS`
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.coordinator: subprocess.Popen | None = None
        self.clients: dict[int, subprocess.Popen] = {}
        self._processes: list[subprocess.Popen] = []
        self._starts = 0

    def _start(self, role: str, args: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        self._starts += 1
        log = open(self.logs / log_name, "a")
        process = subprocess.Popen(self.wrap(role, [sys.executable, *args]), cwd=ROOT, env=env or self.env,
                                   stdout=log, stderr=subprocess.STDOUT)
        self._processes.append(process)
        return process

    @property
    def address_file(self) -> Path:
        return self.workdir / "coordinator.address"

    def start_coordinator(self, *extra: str) -> subprocess.Popen:
        self.address_file.unlink(missing_ok=True)
        self.coordinator = self._start("coordinator", [
            "-m", "server", "--config", str(self.config_path), "--address", f"{self.host}:{self.port}",
            "--run-dir", str(self.run_dir), "--address-file", str(self.address_file), "--wait-for-clients", "180",
            *extra], "coordinator.log")
        return self.coordinator

    def wait_address(self, timeout_s: float = 180) -> str:
        self.wait_for(lambda: self.address_file.exists(), timeout_s, "the coordinator to listen",
                      watch=self.coordinator)
        address = self.address_file.read_text().strip()
        self.port = int(address.rsplit(":", 1)[1])
        return address

    def start(self, clients: int) -> str:
        """The coordinator, then clients 0..clients-1 once it listens; returns its address."""
        self.start_coordinator()
        address = self.wait_address()
        for i in range(clients):
            self.start_client(i)
        return address

    def client_address(self) -> str:
        return f"{self.host}:{self.port}"

    def start_client(self, index: int, *extra: str, address: str | None = None) -> subprocess.Popen:
        process = self._start(f"client-{index}", [
            "-m", "client", "--coordinator", address or self.client_address(), "--name", f"client-{index}",
            "--patience", "90", *extra], f"client-{index}.log")
        self.clients[index] = process
        return process

    def start_torchrun_client(self, index: int, nproc: int, *extra: str) -> subprocess.Popen:
        """Client ``index`` as a torchrun job of ``nproc`` CPU ranks (gloo), as scripts.local_federation starts
        it: rendezvous on 127.0.0.1, gloo on loopback. ``clients[index]`` is torchrun's agent."""
        from scripts.local_federation import torchrun_command

        command = torchrun_command(nproc, f"client-{index}-{self._starts}")[1:]      # [python] comes from _start
        process = self._start(f"client-{index}", [
            *command, "-m", "client", "--coordinator", self.client_address(), "--name", f"client-{index}",
            "--patience", "90", *extra], f"client-{index}.log", env={**self.env, "GLOO_SOCKET_IFNAME": "lo"})
        self.clients[index] = process
        return process

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str,
                 watch: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if watch is not None and watch.poll() is not None:
                raise AssertionError(f"process exited ({watch.returncode}) while waiting for {what}\n"
                                     + self.log("coordinator.log")[-4000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n"
                                     + self.log("coordinator.log")[-4000:])
            time.sleep(0.1)

    def log(self, name: str) -> str:
        path = self.logs / name
        return path.read_text(errors="replace") if path.exists() else ""

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def round_opened(self, round_index: int) -> bool:
        return f"round {round_index}/" in self.log("coordinator.log")

    def signal_client(self, index: int, signum: int) -> None:
        os.kill(self.clients[index].pid, signum)

    def finish(self, timeout_s: float = 300) -> int:
        assert self.coordinator is not None
        try:
            code = self.coordinator.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError("the coordinator did not finish\n" + self.log("coordinator.log")[-4000:]) from None
        for process in self.clients.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        return code

    def close(self) -> None:
        # torchrun's ranks run in sessions of their own: find them before their agent goes.
        ranks = [pid for process in self._processes if process.poll() is None for pid in descendants(process.pid)]
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self._processes:
            if process.poll() is None:
                try:
                    os.kill(process.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                process.kill()
                process.wait()

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
