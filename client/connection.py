"""The client's side of the wire: dial the coordinator, join, fetch tasks, upload updates.

Thin on purpose: it turns protobuf streams into plain values (tensors, ints) and
back, and retries while the coordinator is unreachable. Training lives in
client/trainer.py, the loop in client/runtime.py.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from client.tls_check import diagnose_tls, is_loopback, split_target
from common.codec import CodecError, TensorSink, tensor_pieces
from common.validation import ExpectedTensors, PayloadRejected
from proto import AUTHORIZATION_KEY, KEEPALIVE_OPTIONS, PROTOCOL_VERSION, bearer
from proto import federation_pb2 as pb
from proto.frames import ChunkView, FramedCoordinatorStub, chunk_of
from proto.serde import PayloadAssembler, check_layout, parse_specs, payload_messages, specs_to_proto

log = logging.getLogger(__name__)

T = TypeVar("T")
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.ABORTED}   # ABORTED: an earlier upload stream of ours is still open on the coordinator
_JOIN_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.FAILED_PRECONDITION}
MAX_DOWNLOAD_BYTES = 8 << 30
TLS_REFUSALS_BEFORE_GIVING_UP = 3


class CoordinatorGone(RuntimeError):
    """The coordinator stayed unreachable for longer than the client's patience."""


class RunFinished(Exception):
    """The run is over: the coordinator said so on a long poll (with the rounds completed) or, while this
    client was busy, on its keep-alive stream (rounds_completed None)."""

    def __init__(self, reason: str, rounds_completed: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rounds_completed = rounds_completed


class NotAuthenticated(RuntimeError):
    """The coordinator refused this client's token or certificate."""


class ClientSetupError(ValueError):
    """The client's own settings cannot work (unreadable certificate files, a token without TLS...)."""


class InsecureToken(ClientSetupError):
    """A token would go in cleartext to a host that is not loopback, and nobody said that is acceptable."""


class JoinRefused(RuntimeError):
    """The coordinator refused to register this client (its name, partition or declared size)."""


class RunChanged(RuntimeError):
    """After a reconnect the coordinator serves a different run than the one this client joined."""


class CorruptTask(RuntimeError):
    """A task arrived damaged in transit (truncated, digest mismatch): fetching it again may help."""


class InvalidTask(RuntimeError):
    """The coordinator sent tensors this client must not train on (wrong names, shapes, dtypes, NaN or Inf)."""


@dataclass(frozen=True)
class ClientSecurity:
    token: str | None = None
    tls_ca: str | None = None
    """CA that signed the coordinator's certificate; enables TLS."""
    tls_cert: str | None = None
    tls_key: str | None = None
    """This client's certificate and key, for a coordinator that requires mutual TLS."""
    allow_insecure_token: bool = False
    """Send the token without TLS to a host that is not loopback (a private network with no route out)."""

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def check_token_transport(self, address: str) -> None:
        """Refuse a token in cleartext to anything but loopback, unless allowed; resolves no names, sends nothing."""
        if not self.token or self.uses_tls or self.allow_insecure_token or is_loopback(address):
            return
        host, _port = split_target(address)
        raise InsecureToken(f"the token would travel in cleartext to {host}, which is not a loopback address: use TLS "
                            f"(--tls-ca, with the coordinator on --tls-cert/--tls-key), or pass --allow-insecure-token "
                            f"if {host} is on a private network no one else can reach (such as the compose network "
                            f"on one host)")

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ClientSetupError("--tls-cert and --tls-key go together: give both")

        def read(path: str | None) -> bytes | None:
            try:
                return Path(path).read_bytes() if path else None
            except OSError as error:
                raise ClientSetupError(f"cannot read {path}: {error.strerror}; check --tls-ca, --tls-cert and "
                                       f"--tls-key") from None

        return grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca), private_key=read(self.tls_key),
                                            certificate_chain=read(self.tls_cert))


@dataclass(frozen=True)
class JoinInfo:
    client_id: str
    run_config_json: str
    partition_index: int
    num_partitions: int
    partition_fingerprint: str
    run_id: str
    heartbeat_interval_s: float
    lora_rank: int = 0
    """The LoRA rank this client trains at (0 from a coordinator that does not say: the run's lora_rank)."""


@dataclass(frozen=True)
class ReceivedTask:
    round: int
    method: str
    round_seed: int
    tensors: dict[str, torch.Tensor]
    payload_bytes: int
    base_residual_round: int = 0
    """With the task's base-weight residual folded in, the client's base weights are those of this round."""


@dataclass(frozen=True)
class WaitHint:
    reason: str


class CoordinatorConnection:
    def __init__(self, address: str, patience_s: float = 300.0, max_backoff_s: float = 10.0,
                 security: ClientSecurity | None = None) -> None:
        self.address = address
        self.patience_s = patience_s
        self.max_backoff_s = max_backoff_s
        security = security or ClientSecurity()
        security.check_token_transport(address)     # before any channel exists: nothing has been sent yet
        self.security = security
        options = list(KEEPALIVE_OPTIONS)
        credentials = security.channel_credentials()
        self.channel = (grpc.secure_channel(address, credentials, options=options) if credentials
                        else grpc.insecure_channel(address, options=options))
        self.stub = FramedCoordinatorStub(self.channel)
        self.metadata = ((AUTHORIZATION_KEY, bearer(security.token)),) if security.token else ()
        self.uses_tls = credentials is not None
        self._keepalive_stop = threading.Event()
        self.run_finished_reason: str | None = None   # set by the keep-alive thread when the run ended
        self._keepalive_thread: threading.Thread | None = None

    def close(self) -> None:
        self._keepalive_stop.set()
        self.channel.close()

    def start_keepalive(self, current_client_id: Callable[[], str], interval_s: float) -> None:
        """Hold a KeepAlive stream open in the background, one Heartbeat per interval, reopening it after errors."""
        def beats() -> Iterator[pb.Heartbeat]:
            client_id = current_client_id()
            while not self._keepalive_stop.is_set() and client_id == current_client_id():
                yield pb.Heartbeat(protocol_version=PROTOCOL_VERSION, client_id=client_id)
                self._keepalive_stop.wait(interval_s)

        def loop() -> None:
            while not self._keepalive_stop.is_set():
                try:
                    reply = self.stub.KeepAlive(beats(), metadata=self.metadata)
                    if reply.run_over:
                        self.run_finished_reason = reply.message
                        return
                except grpc.RpcError as error:
                    log.debug("keep-alive stream ended: %s", error.code().name)
                except ValueError:      # the channel was closed under us
                    return
                self._keepalive_stop.wait(min(interval_s, 1.0))

        self._keepalive_thread = threading.Thread(target=loop, name="keepalive", daemon=True)
        self._keepalive_thread.start()

    def _with_retry(self, what: str, call: Callable[[], T]) -> T:
        """Retry transient failures with capped exponential backoff and jitter, up to the patience."""
        started = time.monotonic()
        delay = 0.5
        tls_refusals = 0
        while True:
            if self.run_finished_reason is not None:
                raise RunFinished(self.run_finished_reason)
            try:
                return call()
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise NotAuthenticated(f"coordinator at {self.address} refused this client: "
                                           f"{error.details()}") from None
                tls_refusals = tls_refusals + 1 if self.uses_tls and _is_tls_refusal(error) else 0
                if tls_refusals:
                    # A certificate problem does not fix itself: name it at the first refusal.
                    diagnosis = self._diagnose_tls()
                    if diagnosis:
                        raise NotAuthenticated(f"TLS with {self.address} failed: {diagnosis}") from None
                if tls_refusals >= TLS_REFUSALS_BEFORE_GIVING_UP:
                    # gRPC enforces mutual TLS in the handshake, so a refused certificate never reaches a
                    # handler that could answer UNAUTHENTICATED; the coordinator just closes the socket.
                    raise NotAuthenticated(f"TLS handshake with {self.address} refused {tls_refusals} times "
                                           f"(UNAUTHENTICATED): check --tls-ca, and for a coordinator that requires "
                                           f"mutual TLS, --tls-cert/--tls-key signed by its CA ({error.details()})") from None
                if error.code() not in _RETRYABLE:
                    raise
                waited = time.monotonic() - started
                if waited > self.patience_s:
                    raise CoordinatorGone(f"coordinator at {self.address} unreachable for {waited:.0f}s during "
                                          f"{what} (patience {self.patience_s:.0f}s): {error.details()}") from None
                log.info("%s: coordinator at %s not reachable (%s); retrying in %.1fs",
                         what, self.address, error.code().name, delay)
                time.sleep(delay * (0.75 + 0.5 * random.random()))
                delay = min(delay * 2, self.max_backoff_s)

    def _diagnose_tls(self) -> str | None:
        try:
            return diagnose_tls(self.address, self.security)
        except Exception as error:  # noqa: BLE001 - a failing probe must not hide the refusal it probes
            log.debug("TLS diagnosis of %s failed: %r", self.address, error)
            return None

    def join(self, name: str, partition_index: int = -1, device: str = "", num_examples: int = 0,
             own_data: bool = False, lora_rank: int = 0) -> JoinInfo:
        """Register under ``name``; retried while the coordinator is unreachable. ``num_examples`` > 0 declares
        the size of this client's own data, which its uploads are then bound to; ``own_data`` without it says
        that size will come with a second join, once the data is loaded. ``lora_rank`` > 0 asks to train at
        that rank (heterogeneous ranks); the reply says the rank the run gives this client."""
        request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, client_name=name, partition_index=partition_index,
                                 device=device, num_examples=num_examples, own_data=own_data, lora_rank=lora_rank)
        try:
            reply = self._with_retry("join", lambda: self.stub.Join(request, timeout=30, metadata=self.metadata))
        except grpc.RpcError as error:
            if error.code() in _JOIN_REFUSALS:
                raise JoinRefused(f"coordinator at {self.address} refused to register {name!r}: "
                                  f"{error.details()}") from None
            raise
        return JoinInfo(reply.client_id, reply.run_config_json, reply.partition_index, reply.num_partitions,
                        reply.partition_fingerprint, reply.run_id, reply.heartbeat_interval_ms / 1000 or 5.0,
                        reply.lora_rank)

    def next_task(self, client_id: str, expected: ExpectedTensors | None = None,
                  base_residual_round: int = 0) -> ReceivedTask | WaitHint:
        """Long poll for work. With ``expected``, a task is checked as strictly as the coordinator checks
        uploads: its header before the payload is read, its values once it is whole (InvalidTask).
        ``base_residual_round``: the last round whose base-weight residual this client has folded in."""
        request = pb.TaskRequest(protocol_version=PROTOCOL_VERSION, client_id=client_id,
                                 base_residual_round=base_residual_round)
        return self._with_retry("fetch task", lambda: self._receive_task(
            self.stub.GetTask(request, timeout=600, metadata=self.metadata), expected))

    @staticmethod
    def _receive_task(stream: Iterator[ChunkView | pb.TaskMessage],
                      expected: ExpectedTensors | None) -> ReceivedTask | WaitHint:
        first = next(stream)
        kind = "chunk" if chunk_of(first) is not None else first.WhichOneof("kind")
        if kind == "wait":
            return WaitHint(first.wait.reason)
        if kind == "finished":
            raise RunFinished(first.finished.reason, first.finished.rounds_completed)
        if kind != "header":
            raise RuntimeError(f"coordinator sent {kind!r} before a task header")
        header = first.header
        sender = f"the coordinator (round {header.round})"
        limit = expected.max_bytes if expected is not None else MAX_DOWNLOAD_BYTES
        try:
            specs = parse_specs(header.payload)
            if expected is not None:              # what is wrong by name first, then sizes and offsets
                expected.check_specs(specs, sender)
            check_layout(specs, header.payload.total_bytes, limit)
        except (CodecError, PayloadRejected) as error:
            raise InvalidTask(f"task header from {sender} refused: {error}") from None
        sink = TensorSink(specs)              # the checked size, allocated once, written as chunks arrive
        assembler = PayloadAssembler(header.payload.total_bytes, sink.write)
        try:
            for message in stream:
                chunk = chunk_of(message)
                if chunk is not None:
                    assembler.add(chunk)
                elif message.WhichOneof("kind") == "trailer":
                    assembler.finish(message.trailer)
                    break
            else:
                raise CorruptTask(f"task stream for round {header.round} ended before its trailer "
                                  f"({assembler.received} of {header.payload.total_bytes} bytes)")
        except CodecError as error:
            raise CorruptTask(f"task for round {header.round} arrived damaged: {error}") from None
        tensors = sink.tensors()
        if expected is not None:
            try:
                tensors = expected.check_values(tensors, sender)
            except PayloadRejected as error:
                raise InvalidTask(str(error)) from None
        return ReceivedTask(header.round, header.method, header.round_seed, tensors, header.payload.total_bytes,
                            header.base_residual_round)

    def submit(self, client_id: str, round_index: int, num_examples: int, tensors: dict[str, torch.Tensor],
               train_loss: float, train_seconds: float, local_steps: int) -> pb.SubmitReply:
        specs, pieces = tensor_pieces(tensors)    # each tensor's memory, copied once, into its chunks
        total_bytes = sum(len(piece) for piece in pieces)

        def messages() -> Iterator[pb.UpdateMessage]:
            yield pb.UpdateMessage(header=pb.UpdateHeader(
                protocol_version=PROTOCOL_VERSION, client_id=client_id, round=round_index,
                num_examples=num_examples, train_loss=train_loss, train_seconds=train_seconds,
                local_steps=local_steps, payload=specs_to_proto(specs, total_bytes)))
            yield from payload_messages(pieces, pb.UpdateMessage)

        return self._with_retry("upload", lambda: self.stub.SubmitUpdate(messages(), timeout=600,
                                                                          metadata=self.metadata))


def _is_tls_refusal(error: grpc.RpcError) -> bool:
    """A handshake the peer refused (bad or missing certificate) surfaces as UNAVAILABLE; tell it apart."""
    details = (error.details() or "").lower()
    return any(word in details for word in ("handshake", "ssl", "certificate", "tls", "socket closed",
                                            "verification check"))
