"""Authentication on the coordinator: a shared token in gRPC metadata, TLS and mutual TLS."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from proto import AUTHORIZATION_KEY, bearer

_OPEN_METHODS = ("/grpc.health.v1.Health/",)   # probes (Docker HEALTHCHECK) need no token


@dataclass(frozen=True)
class SecurityConfig:
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    """With a CA the coordinator requires client certificates signed by it (mutual TLS)."""

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both (make certs creates a pair)")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key: mutual TLS is TLS plus client certificates")
        for path in (self.tls_cert, self.tls_key, self.tls_ca):
            if path and not Path(path).is_file():
                raise ValueError(f"certificate file {path!r} does not exist (make certs creates certs/)")

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_cert)


def _reject(message: str) -> grpc.RpcMethodHandler:
    def handler(_request, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return grpc.unary_unary_rpc_method_handler(handler)


def _reject_stream(message: str) -> grpc.RpcMethodHandler:
    def handler(_request_iterator, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return grpc.stream_unary_rpc_method_handler(handler)


class TokenInterceptor(grpc.ServerInterceptor):
    """Every call but health checks must carry ``authorization: Bearer <token>``; others get UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = bearer(token).encode()

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_OPEN_METHODS):
            return continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata or ()).get(AUTHORIZATION_KEY, "")
        if hmac.compare_digest(presented.encode(), self._expected):
            return continuation(handler_call_details)
        message = ("missing or wrong token: start the client with the coordinator's token "
                   "(--token-file or SUBSPACEFL_TOKEN)")
        handler = continuation(handler_call_details)
        if handler is not None and handler.request_streaming:
            return _reject_stream(message)
        if handler is not None and handler.response_streaming:
            def stream_handler(_request, context: grpc.ServicerContext):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                yield  # pragma: no cover - abort raises
            return grpc.unary_stream_rpc_method_handler(stream_handler)
        return _reject(message)


def bind(server: grpc.Server, address: str, security: SecurityConfig) -> int:
    """Add the listening port, with TLS (and client certificates when a CA is given) if configured."""
    if not security.uses_tls:
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials(
        [(Path(security.tls_key).read_bytes(), Path(security.tls_cert).read_bytes())],
        root_certificates=Path(security.tls_ca).read_bytes() if security.tls_ca else None,
        require_client_auth=bool(security.tls_ca),
    )
    return server.add_secure_port(address, credentials)
