"""``python -m server status --coordinator HOST:PORT``: ask a running coordinator how its run is going.

One Status call over the same channel a client would open (TLS, mutual TLS and the shared token
alike); prints the run's round, phase, elapsed time and ETA and a table of the clients, or with
``--json`` one JSON object for scripts. Exit status: 0 on an answer, 1 when the coordinator cannot be
reached or refuses, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

from proto import AUTHORIZATION_KEY, PROTOCOL_VERSION, bearer
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as pb_grpc
from server.status import ClientStatus, RunStatus, format_status


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server status",
        description="Print a running coordinator's view of its federation: run id, method, round, phase, "
                    "elapsed time and ETA, and every client's state (joined, training, uploaded, dropped, gone), "
                    "last keep-alive, rounds taken part in and partition size.",
        epilog="Example: python -m server status --coordinator 127.0.0.1:50051 --token-file certs/token "
               "--tls-ca certs/ca.pem")
    parser.add_argument("--coordinator", required=True, help="host:port of the coordinator")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="give up after this long (default: 10)")
    parser.add_argument("--token-file", help="the coordinator's shared token (or set SUBSPACEFL_TOKEN)")
    parser.add_argument("--tls-ca", help="CA (PEM) that signed the coordinator's certificate; enables TLS")
    parser.add_argument("--tls-cert", help="a client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", help="its private key (PEM), for mutual TLS")
    parser.add_argument("--allow-insecure-token", action="store_true",
                        help="send the token without TLS (it travels in cleartext; loopback tests only)")
    return parser.parse_args(argv)


def _channel(args: argparse.Namespace) -> tuple[grpc.Channel, list[tuple[str, str]]]:
    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("SUBSPACEFL_TOKEN")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together (mutual TLS)")
    if args.tls_cert and not args.tls_ca:
        raise ValueError("--tls-cert needs --tls-ca (the CA of the coordinator's certificate)")
    if token and not args.tls_ca and not args.allow_insecure_token:
        raise ValueError("a token without TLS would travel in cleartext; add --tls-ca, or "
                         "--allow-insecure-token on loopback")
    metadata = [(AUTHORIZATION_KEY, bearer(token))] if token else []
    if not args.tls_ca:
        return grpc.insecure_channel(args.coordinator), metadata
    read = lambda path: Path(path).read_bytes() if path else None      # noqa: E731
    credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    return grpc.secure_channel(args.coordinator, credentials), metadata


def from_proto(reply: pb.StatusReply) -> RunStatus:
    clients = [ClientStatus(name=c.name, state=c.state, reason=c.reason,
                            seconds_since_keepalive=c.seconds_since_keepalive,
                            rounds_participated=c.rounds_participated, partition=c.partition,
                            num_examples=c.num_examples, lora_rank=c.lora_rank) for c in reply.clients]
    return RunStatus(run_id=reply.run_id, method=reply.method, round=reply.round, num_rounds=reply.num_rounds,
                     rounds_completed=reply.rounds_completed, phase=reply.phase,
                     elapsed_seconds=reply.elapsed_seconds, eta_seconds=reply.eta_seconds, clients=clients,
                     finished_reason=reply.finished_reason)


def fetch_status(args: argparse.Namespace) -> RunStatus:
    """One Status call; grpc.RpcError when the coordinator is not there or refuses."""
    channel, metadata = _channel(args)
    with channel:
        reply = pb_grpc.CoordinatorStub(channel).Status(pb.StatusRequest(protocol_version=PROTOCOL_VERSION),
                                                        timeout=args.timeout, metadata=metadata)
    return from_proto(reply)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        status = fetch_status(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(f"error: no status from {args.coordinator}: {error.code().name}: {error.details()}",
              file=sys.stderr)
        return 1
    try:
        print(json.dumps(status.to_dict(), indent=2) if args.json else format_status(status), flush=True)
    except BrokenPipeError:        # piped into head or a closed reader: nothing left to tell, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # so exit's own flush stays quiet
    return 0
