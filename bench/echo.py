"""The raw gRPC baseline of the transport benchmarks: plain grpcio streams of raw bytes, no project code.

A payload goes up a client stream in 1 MiB chunks (the server keeps the chunks) and comes back down a server
stream of the same chunks: an echo with no encoding, no digest, no decoding, no checks. bench/transport.py
and bench/round_overhead.py time it side by side with the project's own path, in the same run.

The server runs in a process of its own (``EchoServerProcess``), as a coordinator does, so that the timed
client does not share a Python interpreter with it; it may host the project's servicer as well
(bench/transport.py), on the same port, with the same gRPC options as the coordinator (server/app.py).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from proto import KEEPALIVE_OPTIONS

SERVICE = "bench.RawEcho"
CHUNK_BYTES = 1 << 20
SERVER_OPTIONS = [*KEEPALIVE_OPTIONS, ("grpc.http2.min_ping_interval_without_data_ms", 5_000)]
"""As the coordinator's server (server/app.py start_grpc_server)."""


class _Store:
    """Uploaded chunks by the uploader's key (its ``echo-key`` metadata), until it downloads them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunks: dict[str, list[bytes]] = {}

    def upload(self, chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        key = dict(context.invocation_metadata()).get("echo-key", "")
        kept = list(chunks)
        with self._lock:
            self._chunks[key] = kept
        return sum(len(c) for c in kept).to_bytes(8, "little")

    def download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._lock:
            kept = self._chunks.pop(request.decode(), [])
        yield from kept


def add_raw_echo(server: grpc.Server) -> None:
    store = _Store()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Upload": grpc.stream_unary_rpc_method_handler(store.upload),
        "Download": grpc.unary_stream_rpc_method_handler(store.download),
    })])


class RawEchoClient:
    """One channel; ``round_trip`` sends a payload up and reads it back, and times each direction."""

    def __init__(self, address: str, key: str = "0") -> None:
        self.channel = grpc.insecure_channel(address, options=list(KEEPALIVE_OPTIONS))
        self.key = key
        self._upload = self.channel.stream_unary(f"/{SERVICE}/Upload")
        self._download = self.channel.unary_stream(f"/{SERVICE}/Download")

    def round_trip(self, payload: bytes) -> tuple[float, float]:
        """(upload seconds, download seconds); the echoed bytes are checked to be the sent ones' length."""
        view = memoryview(payload)
        started = time.perf_counter()
        sent = self._upload((bytes(view[i: i + CHUNK_BYTES]) for i in range(0, len(payload), CHUNK_BYTES)),
                            metadata=(("echo-key", self.key),), timeout=600)
        uploaded = time.perf_counter()
        echoed = b"".join(self._download(self.key.encode(), timeout=600))
        downloaded = time.perf_counter()
        if int.from_bytes(sent, "little") != len(payload) or len(echoed) != len(payload):
            raise RuntimeError(f"raw echo lost bytes: sent {len(payload)}, stored {int.from_bytes(sent, 'little')}, "
                               f"echoed {len(echoed)}")
        return uploaded - started, downloaded - uploaded

    def close(self) -> None:
        self.channel.close()


def concurrent_round_trips(address: str, payload: bytes, clients: int) -> float:
    """Wall seconds for ``clients`` raw echo clients (one thread and one channel each) to send ``payload`` up
    and read it back, all at once: the raw cost of one round's transfers."""
    echo_clients = [RawEchoClient(address, key=str(i)) for i in range(clients)]
    try:
        echo_clients[0].round_trip(b"warm-up")                  # connect every channel before timing
        for client in echo_clients[1:]:
            client.round_trip(b"warm-up")
        barrier = threading.Barrier(clients + 1)
        errors: list[BaseException] = []

        def work(client: RawEchoClient) -> None:
            barrier.wait()
            try:
                client.round_trip(payload)
            except BaseException as error:      # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(c,)) for c in echo_clients]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return time.perf_counter() - started
    finally:
        for client in echo_clients:
            client.close()


def _serve(pipe, setup: Callable[[grpc.Server], None] | None) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=SERVER_OPTIONS)
    add_raw_echo(server)
    if setup is not None:
        setup(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    pipe.send(port)
    pipe.recv()                       # anything (or the parent's end closing) stops the server
    server.stop(0).wait()             # before the interpreter exits under gRPC's threads


class EchoServerProcess:
    """A gRPC server in a child process on 127.0.0.1 (port 0) with the raw echo, plus whatever ``setup``
    (a picklable function) adds to it before it starts."""

    def __init__(self, setup: Callable[[grpc.Server], None] | None = None, timeout_s: float = 120) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, setup), daemon=True)
        self.process.start()
        if not self._pipe.poll(timeout_s):
            self.process.kill()
            raise RuntimeError(f"the benchmark's gRPC server did not start within {timeout_s:.0f}s")
        self.address = f"127.0.0.1:{self._pipe.recv()}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        try:
            self._pipe.send("stop")
        except OSError:
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def __enter__(self) -> "EchoServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
