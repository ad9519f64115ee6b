"""Container health probe (the image's HEALTHCHECK).

A container that runs the coordinator (``python -m server``) is healthy while the
coordinator answers the standard gRPC health service (``grpc.health.v1``) with
SERVING for ``subspacefl.v1.Coordinator``; compose starts the clients only then.
Any other container (a client, a one-off command) is healthy while it runs:
clients dial out and serve nothing to probe.

With TLS_CERT set (the coordinator runs with TLS, docker/entrypoint.sh) the probe
speaks TLS: it trusts TLS_CA and presents TLS_CERT/TLS_KEY, the coordinator's own
certificate, as its client certificate (make certs issues it for serverAuth and
clientAuth), so it passes a coordinator that requires client certificates. The
coordinator's certificate need not name the probed address: the probe takes a
name from the certificate the coordinator presents (a first handshake, verified
against TLS_CA) and checks the gRPC connection against that name.

    python /app/docker/healthcheck.py [--address HOST:PORT] [--service NAME]
                                      [--tls-ca FILE --tls-cert FILE --tls-key FILE]
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
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


class ProbeError(Exception):
    """The probe could not ask the coordinator (one line: what and why)."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ProbeError(f"{address}: give HOST:PORT")
    return host.strip("[]"), int(port)


def server_name(address: str, tls: tuple[str, str, str], timeout_s: float) -> str:
    """A name the coordinator's certificate holds, preferring the probed host, then ``localhost``.

    One TLS handshake with Python's ``ssl``: the certificate verified against the CA, the host name not
    checked (this is how the probe learns a name to check it against); the probe's client certificate
    presented, as the coordinator may require one.
    """
    ca, cert, key = tls
    host, port = split_address(address)
    try:
        context = ssl.create_default_context(cafile=ca)
        context.check_hostname = False
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ProbeError(f"cannot use the TLS files (TLS_CA={ca}, TLS_CERT={cert}, TLS_KEY={key}): "
                         f"{getattr(error, 'strerror', None) or error}") from None
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=host) as connection:
            peer = connection.getpeercert() or {}
            # TLS 1.3: a refused client certificate shows on the first read (an alert or a closed connection);
            # a working gRPC server sends its HTTP/2 SETTINGS right away.
            connection.settimeout(min(timeout_s, 1.0))
            try:
                refused = not connection.recv(1)
            except TimeoutError:
                refused = False
            except (ssl.SSLError, ConnectionError):
                refused = True
            if refused:
                raise ProbeError(f"{address}: the coordinator closed the connection after the TLS handshake: it "
                                 f"refused the probe's certificate TLS_CERT={cert}, which needs extendedKeyUsage "
                                 "clientAuth and the CA the coordinator trusts (make certs issues it so)")
    except ProbeError:
        raise
    except ssl.SSLCertVerificationError as error:
        raise ProbeError(f"{address}: the coordinator's certificate does not verify against TLS_CA={ca}: "
                         f"{error.verify_message}") from None
    except ssl.SSLError as error:
        reason = error.reason or str(error)
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            raise ProbeError(f"{address}: the coordinator does not answer with TLS ({reason}); "
                             "it runs without --tls-cert, but TLS_CERT is set") from None
        raise ProbeError(f"{address}: TLS handshake failed ({reason}); the probe presents TLS_CERT={cert} as its "
                         "client certificate: it needs extendedKeyUsage clientAuth (make certs issues it so)") from None
    except OSError as error:
        raise ProbeError(f"{address}: {error.strerror or error}") from None
    names = [value for kind, value in peer.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    for preferred in (host, "localhost"):
        if preferred in names:
            return preferred
    if not names:
        raise ProbeError(f"{address}: the coordinator's certificate holds no subjectAltName to check it against")
    return names[0]


def probe(address: str, service: str, timeout_s: float,
          tls: tuple[str, str, str] | None = None) -> tuple[bool, str]:
    """Ask the health service; ``tls`` = (CA, certificate, key) for a coordinator that runs TLS."""
    import grpc  # only the coordinator's probe pays for importing grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls is None:
        channel, via = grpc.insecure_channel(address), ""
    else:
        try:
            name = server_name(address, tls, timeout_s)
        except ProbeError as error:
            return False, str(error)
        ca, cert, key = (Path(path).read_bytes() for path in tls)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        channel = grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", name)])
        via = f" (TLS, certificate name {name})"
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            return False, f"{address}{via}: {error.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{address}{via} {service!r}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=f"127.0.0.1:{os.environ.get('PORT', '50051')}",
                        help="the coordinator's host:port inside the container (default: 127.0.0.1:$PORT or 50051)")
    parser.add_argument("--service", default=SERVICE_NAME, help=f"health service name (default: {SERVICE_NAME})")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    parser.add_argument("--force", action="store_true", help="probe even if no coordinator runs in this container")
    parser.add_argument("--tls-ca", default=os.environ.get("TLS_CA") or None,
                        help="CA that signed the coordinator's certificate (default: $TLS_CA)")
    parser.add_argument("--tls-cert", default=os.environ.get("TLS_CERT") or None,
                        help="certificate the probe presents; setting it means the coordinator runs TLS "
                             "(default: $TLS_CERT, the coordinator's own)")
    parser.add_argument("--tls-key", default=os.environ.get("TLS_KEY") or None,
                        help="its private key (default: $TLS_KEY)")
    args = parser.parse_args(argv)
    if not args.force and not runs_coordinator():
        return 0
    tls = None
    if args.tls_cert or args.tls_key or args.tls_ca:
        if not (args.tls_cert and args.tls_key and args.tls_ca):
            print("TLS probe needs TLS_CA, TLS_CERT and TLS_KEY (or --tls-ca, --tls-cert, --tls-key)")
            return 1
        tls = (args.tls_ca, args.tls_cert, args.tls_key)
    healthy, message = probe(args.address, args.service, args.timeout, tls)
    print(message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
