"""The wire contract (federation.proto) and its generated Python code.

``federation_pb2.py``, ``federation_pb2_grpc.py`` and ``federation_pb2.pyi`` are generated from
federation.proto by grpcio-tools (the version pinned in requirements-dev.txt) and committed: importing
this package never runs protoc. After editing federation.proto, run ``make proto`` (``generate()``) and
commit the regenerated files; tests/test_proto_generated.py fails until they match the .proto.
"""

from __future__ import annotations

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
GENERATED = ("federation_pb2.py", "federation_pb2_grpc.py", "federation_pb2.pyi")
"""The files grpcio-tools writes next to federation.proto (all three are committed)."""


def generate(out_dir: str | Path | None = None) -> list[Path]:
    """Run grpc_tools.protoc on federation.proto; write the generated files into ``out_dir``/proto/ (default:
    this package, as ``make proto`` does) and return their paths. grpcio-tools is a development dependency
    (requirements-dev.txt): the installed package only imports the committed files."""
    from grpc_tools import protoc

    root = _HERE.parent
    out = Path(out_dir) if out_dir is not None else root
    (out / "proto").mkdir(parents=True, exist_ok=True)
    status = protoc.main([
        "grpc_tools.protoc", f"-I{root}", f"--python_out={out}", f"--pyi_out={out}",
        f"--grpc_python_out={out}", str(_PROTO.relative_to(root)),
    ])
    if status != 0:
        raise RuntimeError(f"protoc failed on {_PROTO} (exit {status})")
    return [out / "proto" / name for name in GENERATED]
