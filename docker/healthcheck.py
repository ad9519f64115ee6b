"""Container health probe (the image's HEALTHCHECK).

A container that runs the coordinator (``python -m server``) is healthy while the
coordinator answers the standard gRPC health service (``grpc.health.v1``) with
SERVING for ``subspacefl.v1.Coordinator``; compose starts the clients only then.
Any other container (a client, a one-off command) is healthy while it runs:
clients dial out and serve nothing to probe.

    python /app/docker/healthcheck.py [--address HOST:PORT] [--service NAME]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SERVICE_NAME = "subspacefl.v1.Coordinator"


def runs_coordinator(proc: Path = Path("/proc")) -> bool:
    """True if some process in this container was started as ``python -m server``."""
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        if any(a == b"-m" and b == b"server" for a, b in zip(argv, argv[1:])):
            return True
    return False


def probe(address: str, service: str, timeout_s: float) -> tuple[bool, str]:
    import grpc  # only the coordinator's probe pays for importing grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            return False, f"{address}: {error.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{address} {service!r}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=f"127.0.0.1:{os.environ.get('PORT', '50051')}",
                        help="the coordinator's host:port inside the container (default: 127.0.0.1:$PORT or 50051)")
    parser.add_argument("--service", default=SERVICE_NAME, help=f"health service name (default: {SERVICE_NAME})")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    parser.add_argument("--force", action="store_true", help="probe even if no coordinator runs in this container")
    args = parser.parse_args(argv)
    if not args.force and not runs_coordinator():
        return 0
    healthy, message = probe(args.address, args.service, args.timeout)
    print(message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
