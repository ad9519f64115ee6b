"""Transport (P3): the project's path for a payload against a raw grpcio echo of the same bytes, side by side.

    python -m bench.transport            # RoBERTa-large r = 8 (14,221,312 bytes) and 10x, 10 timed round trips each
    python -m bench.transport --quick    # the same payloads, 3 round trips each (well under a minute)
    python -m bench.transport --layout encoder:2x64x256 --rank 4 --reps 1    # tiny (tests)

One gRPC server in a child process on 127.0.0.1 (port 0; the coordinator's gRPC options) hosts both sides:

- *project*: the real ``server.servicer.CoordinatorServicer`` in front of a stand-in coordinator that holds
  the payload's tensors (the synthetic adapter of common/synthetic.py). A round trip is what a sampled client
  does: ``CoordinatorConnection.next_task`` (the stand-in encodes the tensors, common/codec.py, as the
  coordinator encodes a round's task; the servicer streams 1 MiB chunk messages, proto/frames.py, and a
  SHA-256 trailer; the client checks the header against the expected tensors, writes each chunk into its
  tensors and hashes it, checks the digest and the values), then ``CoordinatorConnection.submit`` of the
  received tensors (chunk messages cut from the tensors' memory, digest; the servicer checks the header,
  writes the chunks into tensors, checks the digest; the stand-in checks the values as the coordinator
  does).
- *raw*: bench/echo.py: the same number of bytes up a client stream in 1 MiB chunks and back down a server
  stream; no encoding, digest, decoding or checks.

Both processes run torch on one thread (``--threads``), as a client does (torch_threads: 1) and as
bench.round_overhead runs the coordinator. The two alternate, one round trip each, after one untimed round trip of each. Figures: the median round
trip, its throughput (2 x payload bytes / seconds, in MB/s = 1e6 bytes/s) and each direction's; the ratio is
project / raw throughput. Target: >= 0.5. The last line printed is one JSON object (also written to
runs/bench/transport.json).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import grpc
import torch

from bench.common import finish, machine
from bench.echo import EchoServerProcess, RawEchoClient
from common.codec import TensorSpec, encode_tensors
from common.synthetic import payload_bytes, synthetic_adapter
from common.validation import ExpectedTensors, PayloadRejected

TARGET = 0.5
CLIENT_ID = "bench-client"


class PayloadProbe:
    """The part of server.coordinator.Coordinator that the servicer's GetTask and SubmitUpdate call, around
    one payload: every fetch encodes it, every upload is checked (header, then values) as a coordinator does."""

    def __init__(self, layout: str, rank: int) -> None:
        self.tensors = synthetic_adapter(layout, rank, seed=0)
        self.tensors = {name: t + 1e-3 for name, t in self.tensors.items()}     # no all-zero B
        self.expected = ExpectedTensors.like(self.tensors)
        self.max_payload_bytes = self.expected.max_bytes
        self.record = SimpleNamespace(name=CLIENT_ID, num_examples=100)
        self.uploads = 0

    def next_task(self, client_id: str, base_residual_round: int = 0):
        from server.coordinator import Task

        specs, buffer = encode_tensors(self.tensors)
        return Task(round=1, method="fedavg", round_seed=0, specs=specs, buffer=buffer)

    def check_upload_header(self, client_id: str, round_index: int, num_examples: int, specs: list[TensorSpec],
                            total_bytes: int):
        from server.errors import BadRequest

        try:
            self.expected.check_specs(specs, CLIENT_ID)
        except PayloadRejected as error:
            raise BadRequest(str(error)) from None
        return self.record

    @contextmanager
    def upload_slot(self, record) -> Iterator[None]:
        yield

    def submit(self, record, round_index: int, tensors: dict[str, torch.Tensor], stats) -> None:
        from server.errors import BadRequest

        try:
            self.expected.check_values(tensors, CLIENT_ID, max_norm=1e4)
        except PayloadRejected as error:
            raise BadRequest(str(error)) from None
        self.uploads += 1

    def finished_for(self, client_id: str):
        return None


def add_project_servicer(server: grpc.Server, layout: str, rank: int, threads: int = 1) -> None:
    """(In the server process.) The real servicer in front of a PayloadProbe."""
    from proto.frames import add_coordinator_servicer
    from server.servicer import CoordinatorServicer

    torch.set_num_threads(threads)

    add_coordinator_servicer(CoordinatorServicer(PayloadProbe(layout, rank), ["bench"]), server)


def _project_round_trip(connection, expected: ExpectedTensors) -> tuple[float, float]:
    """(download seconds, upload seconds) of one task fetched and sent back through the project's code."""
    started = time.perf_counter()
    task = connection.next_task(CLIENT_ID, expected)
    fetched = time.perf_counter()
    connection.submit(CLIENT_ID, task.round, 100, task.tensors, 0.0, 0.0, 0)
    return fetched - started, time.perf_counter() - fetched


def measure(layout: str, rank: int, reps: int, threads: int = 1) -> dict:
    """Both sides for one payload (the synthetic adapter of ``layout`` at ``rank``), alternating; ``threads``:
    torch threads on both ends."""
    from client.connection import CoordinatorConnection

    torch.set_num_threads(threads)

    size = payload_bytes(layout, rank)
    expected = ExpectedTensors.like(synthetic_adapter(layout, rank, seed=0))
    raw_payload = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
                                ).numpy().tobytes()
    with EchoServerProcess(functools.partial(add_project_servicer, layout=layout, rank=rank, threads=threads)) as server:
        connection = CoordinatorConnection(server.address, patience_s=30)
        raw = RawEchoClient(server.address)
        try:
            _project_round_trip(connection, expected)          # untimed: connect, allocate
            raw.round_trip(raw_payload)
            project_s, raw_s = [], []
            for _ in range(reps):
                project_s.append(_project_round_trip(connection, expected))
                raw_s.append(raw.round_trip(raw_payload))
        finally:
            connection.close()
            raw.close()
    project, raw_side = _figures(project_s, size, "download", "upload"), _figures(raw_s, size, "upload", "download")
    return {"layout": layout, "rank": rank, "payload_bytes": size, "reps": reps, "project": project, "raw": raw_side,
            "ratio": project["round_trip_mb_s"] / raw_side["round_trip_mb_s"]}


def _figures(pairs: list[tuple[float, float]], size: int, first: str, second: str) -> dict:
    trips = [a + b for a, b in pairs]
    return {"round_trip_s": statistics.median(trips), "round_trip_mb_s": 2 * size / statistics.median(trips) / 1e6,
            f"{first}_mb_s": size / statistics.median(a for a, _ in pairs) / 1e6,
            f"{second}_mb_s": size / statistics.median(b for _, b in pairs) / 1e6,
            "round_trips_s": [round(t, 4) for t in trips]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed round trips per payload instead of 10")
    parser.add_argument("--layout", default="roberta-large", help="synthetic adapter layout (default: roberta-large)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the payload (default: 8)")
    parser.add_argument("--multiples", default="1,10",
                        help="payload sizes as multiples of the layout's rank-r payload (default: 1,10)")
    parser.add_argument("--reps", type=int, default=None, help="timed round trips per payload (default: 10; 3 quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in both processes (default: 1, a client's torch_threads; more threads "
                             "spin-wait on a busy machine, see BENCHMARKS.md)")
    parser.add_argument("--out", default=None, help="also write the JSON here (default: runs/bench/transport.json)")
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 10)
    print(f"machine: {machine()}", flush=True)
    sizes = []
    for multiple in (int(m) for m in args.multiples.split(",")):
        figures = measure(args.layout, args.rank * multiple, reps, args.threads)   # bytes grow with the rank
        sizes.append(figures)
        print(f"{figures['payload_bytes']:>12,d} bytes: project {figures['project']['round_trip_mb_s']:8.1f} MB/s "
              f"(down {figures['project']['download_mb_s']:.1f}, up {figures['project']['upload_mb_s']:.1f}); "
              f"raw echo {figures['raw']['round_trip_mb_s']:8.1f} MB/s (up {figures['raw']['upload_mb_s']:.1f}, "
              f"down {figures['raw']['download_mb_s']:.1f}); ratio {figures['ratio']:.2f} (target >= {TARGET})",
              flush=True)
    worst = min(s["ratio"] for s in sizes)
    finish({"bench": "transport", "quick": args.quick, "threads": args.threads, "sizes": sizes, "ratio_min": worst, "target": TARGET,
            "met": worst >= TARGET, "machine": machine()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
