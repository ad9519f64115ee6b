"""Scale (P5): one coordinator holding 100, 300 and 1,000 joined clients, 10% sampled per round.

    python -m bench.scale                 # K = 100, 300, 1000; MiniLM r = 8 payload; 3 rounds each (~10 min)
    python -m bench.scale --quick         # K = 30, 100; 3 rounds each
    python -m bench.scale --clients 20 --rounds 2 --idle 3 --layout encoder:2x64x256   # tiny (tests)

A real coordinator process (``python -m server``) in the benchmark-only mode (``synthetic_layout``,
common/synthetic.py: no model, no data, no evaluation) and K *light clients*: a few processes
(``python -m bench.scale --light ...``), each holding many clients, every one with its own gRPC channel, name,
keep-alive stream and long poll (client/connection.py's CoordinatorConnection, as a real client), answering
a task at once with the received factors slightly perturbed (client/bench_echo.py's EchoTrainer).

Per K:
- *join*: seconds from the first light client ready (imports done) until the last one joined;
- *idle*: with K - 1 clients joined (the last one holds back, so no round starts), the coordinator's CPU
  (utime + stime from /proc/PID/stat) over ``--idle`` seconds: keep-alives and long polls only; in % of one core;
- *rounds*: the round's wall time (between consecutive metrics lines, rounds 2..R), with m = ceil(K / 10) sampled;
- *memory*: the coordinator's RSS idle (VmRSS) and its peak over the run (VmHWM), against m x payload
  (what a round must hold) and K x payload (what it must not).

Targets: 1,000 clients held on this machine; round time grows with m, not K; memory grows with m x payload,
not K x payload. The last line printed is one JSON object (also written to runs/bench/scale.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import finish, machine
from common.synthetic import payload_bytes

CLIENTS_PER_PROCESS = 250
FRACTION = 0.1
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- light clients (child processes)

def _light_client(address: str, name: str, echo, hold: threading.Event | None, joined: threading.Event,
                  stop: threading.Event) -> None:
    from client.connection import CoordinatorConnection, RunFinished, WaitHint

    if hold is not None:
        hold.wait()
    connection = CoordinatorConnection(address, patience_s=120)
    try:
        info = connection.join(name, device="bench")
        joined.set()
        connection.start_keepalive(lambda: info.client_id, info.heartbeat_interval_s)
        expected = echo.expected_task()
        while not stop.is_set():
            try:
                task = connection.next_task(info.client_id, expected)
            except RunFinished:
                return
            if isinstance(task, WaitHint):
                continue
            result = echo.train_round(task.round, task.tensors, task.round_seed)
            connection.submit(info.client_id, task.round, result.num_examples, result.tensors, 0.0,
                              result.train_seconds, 0)
    finally:
        connection.close()


def _run_light(address: str, first: int, count: int, hold_last: str | None, config_json: str) -> int:
    """(A child process.) Clients first..first+count-1; with ``hold_last``, the last one joins once that file
    exists. Prints one JSON line when ready, one when all (but a held one) joined; returns when all end."""
    from client.bench_echo import EchoTrainer
    from common.config import RunConfig

    config = RunConfig.from_json(config_json)
    echo = EchoTrainer(config, config.model.lora_rank, partition=0, num_partitions=config.data.num_clients)
    print(json.dumps({"ready": time.time()}), flush=True)
    stop = threading.Event()
    hold = threading.Event()
    threads, joined = [], []
    for i in range(first, first + count):
        held = hold_last is not None and i == first + count - 1
        event = threading.Event()
        thread = threading.Thread(target=_light_client, daemon=True, name=f"light-{i}",
                                  args=(address, f"light-{i}", echo, hold if held else None, event, stop))
        thread.start()
        threads.append(thread)
        if not held:
            joined.append(event)
    for event in joined:
        event.wait()
    print(json.dumps({"joined": len(joined), "at": time.time()}), flush=True)
    if hold_last is not None:
        while not Path(hold_last).exists():
            time.sleep(0.1)
        hold.set()
    for thread in threads:
        thread.join()
    return 0


# ---------------------------------------------------------------------------- the coordinator's side

def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")     # utime + stime


def _proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def run_scale(k: int, layout: str, rank: int, rounds: int, idle_s: float, workdir: Path, timeout_s: float,
              threads: int = 1) -> dict:
    from tests.integration.harness import Federation

    config = {"model_name": "synthetic", "synthetic_layout": layout, "lora_rank": rank, "lora_alpha": 2 * rank,
              "method": "fedavg", "num_clients": k, "client_fraction": FRACTION, "num_rounds": rounds, "seed": 42,
              "round_timeout_s": 600, "heartbeat_timeout_s": 30}
    go = workdir / "go"
    with Federation(workdir, config) as federation:
        coordinator = federation.start_coordinator("--log-level", "WARNING", "--wait-for-clients", str(timeout_s),
                                                   "--threads", str(threads))
        address = federation.wait_address()
        config_json = json.dumps({**config, "model_name": "synthetic"})
        processes = math.ceil(k / CLIENTS_PER_PROCESS)
        lights = []
        for p in range(processes):
            first = p * k // processes
            count = (p + 1) * k // processes - first
            command = [sys.executable, "-m", "bench.scale", "--light", address, str(first), str(count),
                       "--config-json", config_json]
            if p == processes - 1:
                command += ["--hold-last", str(go)]
            lights.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                           stderr=open(workdir / f"light-{p}.log", "w"), env=federation.env))
        reports = [[json.loads(process.stdout.readline()) for _ in range(2)] for process in lights]
        ready = min(r[0]["ready"] for r in reports)
        joined_at = max(r[1]["at"] for r in reports)
        time.sleep(1.0)                                     # the last joins' long polls settle
        rss_idle_kb = _proc_status_kb(coordinator.pid, "VmRSS")
        threads_idle = _proc_status_kb(coordinator.pid, "Threads")
        cpu_before, started = _proc_cpu_s(coordinator.pid), time.monotonic()
        time.sleep(idle_s)
        idle_cpu = (_proc_cpu_s(coordinator.pid) - cpu_before) / (time.monotonic() - started)
        go.write_text("go\n")
        peak_kb = 0
        deadline = time.monotonic() + timeout_s
        while coordinator.poll() is None and time.monotonic() < deadline:
            try:
                peak_kb = max(peak_kb, _proc_status_kb(coordinator.pid, "VmHWM"))
            except OSError:
                break
            time.sleep(0.2)
        if coordinator.poll() is None:
            raise RuntimeError(f"K={k}: the run did not end within {timeout_s:.0f}s\n"
                               + federation.log("coordinator.log")[-3000:])
        if coordinator.returncode != 0:
            raise RuntimeError(f"K={k}: the coordinator exited {coordinator.returncode}\n"
                               + federation.log("coordinator.log")[-3000:])
        for process in lights:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
        metrics = federation.metrics()
    stamps = [m["timestamp"] for m in metrics]
    walls = [b - a for a, b in zip(stamps, stamps[1:])]
    sampled = math.ceil(k * FRACTION - 1e-9)
    size = payload_bytes(layout, rank)
    return {
        "k": k, "sampled": sampled, "rounds": len(metrics), "processes": processes,
        "participants": [len(m["participants"]) for m in metrics],
        "join_s": joined_at - ready,
        "idle_cpu_percent": 100 * idle_cpu, "idle_window_s": idle_s, "threads_idle": threads_idle,
        "round_wall_s": statistics.median(walls) if walls else None, "round_walls_s": [round(w, 3) for w in walls],
        "round_seconds_median": statistics.median(m["round_seconds"] for m in metrics),
        "aggregation_s_median": statistics.median(m["aggregation_seconds"] for m in metrics),
        "rss_idle_mb": rss_idle_kb / 1024, "rss_peak_mb": peak_kb / 1024,
        "sampled_payload_mb": sampled * size / 2**20, "k_payload_mb": k * size / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 30, 100 instead of 100, 300, 1000")
    parser.add_argument("--clients", default=None, help="comma-separated K values (default: 100,300,1000)")
    parser.add_argument("--layout", default="minilm", help="synthetic adapter layout (default: minilm)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per K (default: 3)")
    parser.add_argument("--idle", type=float, default=None, help="idle window in seconds (default: 20; 10 quick)")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="the coordinator's torch threads (python -m server --threads; default: 1, see BENCHMARKS.md)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one K may take (default: 600)")
    parser.add_argument("--out", default=None, help="also write the JSON here (default: runs/bench/scale.json)")
    parser.add_argument("--light", nargs=3, metavar=("ADDRESS", "FIRST", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--hold-last", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.light:
        address, first, count = args.light
        return _run_light(address, int(first), int(count), args.hold_last, args.config_json)
    ks = [int(k) for k in (args.clients or ("30,100" if args.quick else "100,300,1000")).split(",")]
    rounds = args.rounds or 3
    idle_s = args.idle or (10.0 if args.quick else 20.0)
    print(f"machine: {machine()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as work:
        for k in ks:
            figures = run_scale(k, args.layout, args.rank, rounds, idle_s, Path(work) / f"k{k}", args.timeout,
                                args.server_threads)
            results.append(figures)
            print(f"K={k:5d} (m={figures['sampled']}): join {figures['join_s']:.1f} s, idle CPU "
                  f"{figures['idle_cpu_percent']:.1f}% of a core ({figures['threads_idle']} threads), round "
                  f"{figures['round_wall_s']:.2f} s, RSS idle {figures['rss_idle_mb']:.0f} MB peak "
                  f"{figures['rss_peak_mb']:.0f} MB (m x payload {figures['sampled_payload_mb']:.0f} MB, "
                  f"K x payload {figures['k_payload_mb']:.0f} MB)", flush=True)
    held = max(r["k"] for r in results)
    finish({"bench": "scale", "quick": args.quick, "layout": args.layout, "rank": args.rank,
            "payload_bytes": payload_bytes(args.layout, args.rank), "fraction": FRACTION, "results": results,
            "max_clients_held": held, "target_clients": 1000, "met": held >= 1000 and all(
                r["participants"] == [r["sampled"]] * r["rounds"] for r in results),
            "machine": machine()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
