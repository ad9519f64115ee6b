"""Round overhead (P4): a real round without training against the raw transfer of its payloads, side by side.

    python -m bench.round_overhead            # RoBERTa-large r = 8, 3 clients, fedavg and subspace_reg, 8 rounds each
    python -m bench.round_overhead --quick    # 4 rounds each (about 2 minutes on 2 loaded cores)
    python -m bench.round_overhead --layout encoder:2x64x256 --rank 4 --rounds 3 --methods fedavg   # tiny (tests)

*Federation*: a real coordinator process (``python -m server``) and 3 real client processes
(``python -m client --bench-echo``) on 127.0.0.1, in the benchmark-only mode (``synthetic_layout``,
common/synthetic.py): no model, no data, no evaluation; each client answers its task at once with the
received factors slightly perturbed. Every round is otherwise real: sampling, task encoding, both transfers
with their checks, aggregation (the method's server step), the alignment metrics, the adapter and the
checkpoint written to disk. The round's wall time is the time between two consecutive rounds' metrics lines
(rounds 2..R: round 1 also waits for the clients' first long polls), the median over them.

*Raw echo*: bench/echo.py, 3 threads with a channel each sending the same payload size up a client stream in
1 MiB chunks and reading it back down a server stream, all at once, to a server in its own process: what
moving one round's bytes costs with nothing else. Timed before and after each federation; the median.

Target: round wall time <= 2 x the echo. Also reported: the round less the server's math (aggregation_seconds
of metrics.jsonl: clipping norms, the server step, the alignment metrics), against the same echo. The last line printed is one JSON object (also written to
runs/bench/round_overhead.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import finish, machine
from bench.echo import EchoServerProcess, concurrent_round_trips
from common.synthetic import payload_bytes

TARGET = 2.0
CLIENTS = 3


def federation_config(layout: str, rank: int, method: str, rounds: int) -> dict:
    return {"model_name": "synthetic", "synthetic_layout": layout, "lora_rank": rank, "lora_alpha": 2 * rank,
            "method": method, "num_clients": CLIENTS, "client_fraction": 1.0, "num_rounds": rounds, "seed": 42,
            "max_effective_lora_update_norm": 15, "round_timeout_s": 600, "heartbeat_timeout_s": 30}


def run_federation(workdir: Path, config: dict, timeout_s: float, threads: int = 1) -> list[dict]:
    """A real coordinator and CLIENTS --bench-echo clients; the metrics lines of the finished run."""
    from tests.integration.harness import Federation

    with Federation(workdir, config) as federation:
        federation.start_coordinator("--threads", str(threads))
        federation.wait_address()
        for i in range(CLIENTS):
            federation.start_client(i, "--bench-echo", "--log-level", "WARNING")
        code = federation.finish(timeout_s)
        if code != 0:
            raise RuntimeError(f"the coordinator exited {code}:\n" + federation.log("coordinator.log")[-3000:])
        return federation.metrics()


def round_figures(metrics: list[dict]) -> dict:
    stamps = [line["timestamp"] for line in metrics]
    walls = [b - a for a, b in zip(stamps, stamps[1:])]
    # The same rounds less the server's math (clipping norms, the method's step, the alignment metrics): what
    # the protocol and the transfers cost around it.
    beyond_math = [w - m["aggregation_seconds"] for w, m in zip(walls, metrics[1:])]
    return {
        "rounds": len(metrics),
        "round_wall_s": statistics.median(walls),
        "round_walls_s": [round(w, 3) for w in walls],
        "round_less_aggregation_s": statistics.median(beyond_math),
        "round_seconds_median": statistics.median(m["round_seconds"] for m in metrics[1:]),
        "aggregation_s_median": statistics.median(m["aggregation_seconds"] for m in metrics[1:]),
        "bytes_up_per_round": metrics[-1]["bytes_up"],
        "bytes_down_per_round": metrics[-1]["bytes_down"],
    }


def echo_seconds(size: int, reps: int) -> list[float]:
    payload = bytes(size)
    with EchoServerProcess() as server:
        concurrent_round_trips(server.address, payload, CLIENTS)            # untimed: warm the server
        return [concurrent_round_trips(server.address, payload, CLIENTS) for _ in range(reps)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.round_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 rounds per method instead of 8")
    parser.add_argument("--layout", default="roberta-large", help="synthetic adapter layout (default: roberta-large)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--methods", default="fedavg,subspace_reg", help="comma-separated (default: fedavg,subspace_reg)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per method (default: 8; 4 quick)")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="the coordinator's torch threads (python -m server --threads; default: 1, see BENCHMARKS.md)")
    parser.add_argument("--echo-reps", type=int, default=3, help="raw echo repetitions before and after each run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one federation may take (default: 900)")
    parser.add_argument("--out", default=None, help="also write the JSON here (default: runs/bench/round_overhead.json)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (4 if args.quick else 8)
    if rounds < 2:
        parser.error("--rounds must be at least 2 (the wall time is measured between rounds)")
    size = payload_bytes(args.layout, args.rank)
    print(f"machine: {machine()}", flush=True)
    methods: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-round-overhead-") as work:
        for method in args.methods.split(","):
            before = echo_seconds(size, args.echo_reps)
            metrics = run_federation(Path(work) / method, federation_config(args.layout, args.rank, method, rounds),
                                     args.timeout, args.server_threads)
            after = echo_seconds(size, args.echo_reps)
            figures = round_figures(metrics)
            figures["echo_s"] = statistics.median(before + after)
            figures["echo_runs_s"] = [round(s, 4) for s in before + after]
            figures["ratio"] = figures["round_wall_s"] / figures["echo_s"]
            figures["ratio_less_aggregation"] = figures["round_less_aggregation_s"] / figures["echo_s"]
            methods[method] = figures
            print(f"{method}: round {figures['round_wall_s']:.3f} s (aggregation {figures['aggregation_s_median']:.3f} s)"
                  f" vs raw echo of {CLIENTS} x {size:,d} bytes {figures['echo_s']:.3f} s: ratio {figures['ratio']:.2f} "
                  f"(target <= {TARGET}); less the aggregation {figures['ratio_less_aggregation']:.2f}", flush=True)
    worst = max(m["ratio"] for m in methods.values())
    finish({"bench": "round_overhead", "quick": args.quick, "layout": args.layout, "rank": args.rank,
            "payload_bytes": size, "clients": CLIENTS, "server_threads": args.server_threads, "methods": methods,
            "ratio_max": worst, "target": TARGET,
            "met": worst <= TARGET, "machine": machine()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
