"""The wire contract (federation.proto) and its generated Python code.

`make proto` generates ``federation_pb2.py`` and ``federation_pb2_grpc.py``
next to the .proto with grpcio-tools. So that a fresh clone also works when
someone runs ``python -m server`` before ``make proto``, importing this
package regenerates the code when it is missing or older than the .proto.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

PROTOCOL_VERSION = 2
"""Bumped on every incompatible change of federation.proto."""

AUTHORIZATION_KEY = "authorization"
"""The gRPC metadata key of the shared token: the client sends ``bearer(token)`` under it on every call
(client/connection.py), the coordinator's TokenInterceptor checks it (server/security.py). Lower case:
gRPC metadata keys must be."""


KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),          # an HTTP/2 ping after 10 s without traffic...
    ("grpc.keepalive_timeout_ms", 10_000),       # ...and the transport is dead if it goes unanswered for 10 s
    ("grpc.keepalive_permit_without_calls", 1),  # also between calls: a cut link is found within ~20 s
)
"""gRPC channel options both ends use, so that each detects a dead peer the same way (RELIABILITY.md)."""


def bearer(token: str) -> str:
    """The value sent under AUTHORIZATION_KEY: ``Bearer <token>``."""
    return f"Bearer {token}"

_HERE = Path(__file__).resolve().parent
_PROTO = _HERE / "federation.proto"
_GENERATED = (_HERE / "federation_pb2.py", _HERE / "federation_pb2_grpc.py")


def _is_stale() -> bool:
    source_time = _PROTO.stat().st_mtime
    return any(not path.exists() or path.stat().st_mtime < source_time for path in _GENERATED)


def generate(force: bool = False) -> None:
    """Run grpc_tools.protoc on federation.proto (under a lock: many processes may import at once)."""
    from grpc_tools import protoc  # build-time tool; only needed when regenerating

    with open(_HERE / ".generate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and not _is_stale():
            return
        root = _HERE.parent
        status = protoc.main([
            "grpc_tools.protoc", f"-I{root}", f"--python_out={root}", f"--pyi_out={root}",
            f"--grpc_python_out={root}", str(_PROTO.relative_to(root)),
        ])
        if status != 0:
            raise RuntimeError(f"protoc failed on {_PROTO} (exit {status})")


if _is_stale():
    generate()
