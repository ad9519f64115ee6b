"""Assemble a coordinator: data, partition, model, gRPC server; then drive the rounds."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.config import ConfigError, RunConfig
from common.federated_data import fingerprint, partition_dataset
from common.partition import partition_stats
from common.synthetic import synthetic_partition_sizes
from common.tasks import load_task_data
from proto import KEEPALIVE_OPTIONS
from proto.frames import add_coordinator_servicer
from server.coordinator import Coordinator
from server.global_model import ServerModel, SyntheticModel
from server.outputs import RunDirectory
from server.security import SecurityConfig, TokenInterceptor, bind
from server.servicer import CoordinatorServicer

log = logging.getLogger(__name__)

SERVICE_NAME = "subspacefl.v1.Coordinator"
RESUMABLE_KEYS = {"num_rounds", "round_timeout_s", "heartbeat_timeout_s", "max_round_retries", "quorum_policy"}
"""Keys that may change when a run is resumed; any other difference is refused."""


@dataclass
class CoordinatorApp:
    coordinator: Coordinator
    server: grpc.Server
    health: health.HealthServicer
    port: int
    run_dir: RunDirectory

    def stop(self, grace_s: float = 2.0) -> None:
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace_s).wait()


def _check_run_dir(config: RunConfig, directory: RunDirectory, resume: bool) -> None:
    """Never overwrite a run by accident; on resume, refuse a config that would change its meaning."""
    committed = (directory.checkpoint / "latest.json").exists()
    if committed and not resume:
        raise ConfigError(f"{directory.path} already holds a run; pass --resume to continue it, "
                          f"or choose another --run-dir")
    stored_path = directory.path / "config.yaml"
    if resume and stored_path.exists():
        stored = yaml.safe_load(stored_path.read_text()) or {}
        current = config.to_flat()
        changed = sorted(k for k in current if k not in RESUMABLE_KEYS and stored.get(k) != current[k])
        if changed:
            raise ConfigError(f"--resume with a different config: {', '.join(changed)} differ from "
                              f"{stored_path}; resume with the stored config (--config {stored_path})")


def build_coordinator(config: RunConfig, run_dir: str | Path, address: str = "[::]:50051",
                      poll_timeout_s: float = 10.0, resume: bool = False,
                      security: SecurityConfig | None = None, device: str | None = None) -> CoordinatorApp:
    """``device``: where the evaluation model lives (None: common.modeling.default_device())."""
    directory = RunDirectory(run_dir)
    _check_run_dir(config, directory, resume)
    directory.write_config(config.to_flat())

    if config.model.synthetic_layout is not None:       # benchmark only: no data, no model, no evaluation
        model, sizes, fingerprints = _synthetic_run(config)
        label_names: list[str] = []
    else:
        data = load_task_data(config.data, seed=config.federation.seed)
        partition = partition_dataset(config, data.partition_values)
        directory.write_json("partition_stats.json", partition_stats(partition, data.partition_values))
        log.info("data: %d train / %d eval rows, %d classes, %d clients (%s)", len(data.train), len(data.eval),
                 len(data.label_names), len(partition.indices), partition.scheme)
        model = ServerModel(config, data.eval, num_labels=len(data.label_names), device=device)
        sizes = [len(ix) for ix in partition.indices]
        fingerprints = [fingerprint(ix) for ix in partition.indices]
        label_names = data.label_names
    coordinator = Coordinator(config, directory, model, model.initial_state(), partition_sizes=sizes,
                              poll_timeout_s=poll_timeout_s, run_id=directory.run_id(resume),
                              label_names=label_names)
    if resume:
        committed = coordinator.restore()
        directory.append_event({"event": "resumed", "after_round": committed})

    server, health_servicer, port = start_grpc_server(coordinator, fingerprints, address,
                                                      security or SecurityConfig())
    return CoordinatorApp(coordinator, server, health_servicer, port, directory)


def _synthetic_run(config: RunConfig) -> tuple[SyntheticModel, list[int], list[str]]:
    """A benchmark run's model, partition sizes and fingerprints: common/synthetic.py's, nothing loaded."""
    sizes = synthetic_partition_sizes(config.data.num_clients)
    fingerprints = [fingerprint(list(range(i * size, (i + 1) * size))) for i, size in enumerate(sizes)]
    return SyntheticModel(config), sizes, fingerprints


def start_grpc_server(coordinator: Coordinator, fingerprints: list[str], address: str,
                      security: SecurityConfig = SecurityConfig()) -> tuple[grpc.Server, health.HealthServicer, int]:
    """Bind the servicer and the standard health service; returns the started server and its port."""
    workers = max(16, 3 * len(fingerprints) + 8)   # each client holds a long poll and a keep-alive stream
    interceptors = [TokenInterceptor(security.token)] if security.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors, options=[
        *KEEPALIVE_OPTIONS,
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),   # accept the clients' 10 s pings
    ])
    add_coordinator_servicer(CoordinatorServicer(coordinator, fingerprints), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = bind(server, address, security)
    if port == 0:
        raise OSError(f"could not bind the coordinator to {address}; is the port in use?")
    server.start()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port


def serve(config: RunConfig, run_dir: str | Path, address: str, address_file: str | None,
          wait_for_clients_s: float, resume: bool = False, security: SecurityConfig | None = None,
          device: str | None = None) -> dict:
    app = build_coordinator(config, run_dir, address, resume=resume, security=security, device=device)
    host = address.rsplit(":", 1)[0]
    bound = f"{host}:{app.port}"
    log.info("coordinator listening on %s%s (run directory %s)", bound,
             " with TLS" if security and security.uses_tls else "", app.run_dir.path)
    if address_file:
        Path(address_file).write_text(bound + "\n")

    def on_signal(signum: int, _frame) -> None:
        log.warning("received signal %d: aborting the open round; the last committed round stays", signum)
        app.coordinator.request_stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        summary = app.coordinator.run(wait_for_clients_s=wait_for_clients_s)
        # Clients learn of the end on their next long poll or heartbeat; wait for that before closing the port.
        app.coordinator.wait_until_clients_informed(app.coordinator.heartbeat_interval_s() + 2.0)
        return summary
    finally:
        app.stop()
