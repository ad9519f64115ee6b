"""The client's side of the wire: dial the coordinator, join, fetch tasks, upload updates.

Thin on purpose: it turns protobuf streams into plain values (tensors, ints) and
back, and retries while the coordinator is unreachable. Training lives in
client/trainer.py, the loop in client/runtime.py.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import torch

from common.codec import decode_tensors, encode_tensors
from proto import PROTOCOL_VERSION
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as pb_grpc
from proto.serde import PayloadAssembler, chunks_to_proto, specs_from_proto, specs_to_proto, trailer_to_proto

log = logging.getLogger(__name__)

T = TypeVar("T")
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
MAX_DOWNLOAD_BYTES = 8 << 30


class CoordinatorGone(RuntimeError):
    """The coordinator stayed unreachable for longer than the client's patience."""


@dataclass(frozen=True)
class JoinInfo:
    client_id: str
    run_config_json: str
    partition_index: int
    num_partitions: int
    partition_fingerprint: str
    run_id: str


@dataclass(frozen=True)
class ReceivedTask:
    round: int
    method: str
    round_seed: int
    tensors: dict[str, torch.Tensor]
    payload_bytes: int


@dataclass(frozen=True)
class WaitHint:
    retry_after_ms: int
    reason: str


@dataclass(frozen=True)
class RunOver:
    rounds_completed: int
    reason: str


class CoordinatorConnection:
    def __init__(self, address: str, patience_s: float = 300.0, max_backoff_s: float = 10.0) -> None:
        self.address = address
        self.patience_s = patience_s
        self.max_backoff_s = max_backoff_s
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ])
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _with_retry(self, what: str, call: Callable[[], T]) -> T:
        """Retry transient failures with capped exponential backoff and jitter, up to the patience."""
        started = time.monotonic()
        delay = 0.5
        while True:
            try:
                return call()
            except grpc.RpcError as error:
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

    def join(self, name: str, partition_index: int = -1, device: str = "") -> JoinInfo:
        request = pb.JoinRequest(protocol_version=PROTOCOL_VERSION, client_name=name,
                                 partition_index=partition_index, device=device)
        reply = self._with_retry("join", lambda: self.stub.Join(request, timeout=30))
        return JoinInfo(reply.client_id, reply.run_config_json, reply.partition_index, reply.num_partitions,
                        reply.partition_fingerprint, reply.run_id)

    def next_task(self, client_id: str) -> ReceivedTask | WaitHint | RunOver:
        request = pb.TaskRequest(protocol_version=PROTOCOL_VERSION, client_id=client_id)
        return self._with_retry("fetch task", lambda: self._receive_task(self.stub.GetTask(request, timeout=600)))

    @staticmethod
    def _receive_task(stream: Iterator[pb.TaskMessage]) -> ReceivedTask | WaitHint | RunOver:
        first = next(stream)
        kind = first.WhichOneof("kind")
        if kind == "wait":
            return WaitHint(first.wait.retry_after_ms, first.wait.reason)
        if kind == "finished":
            return RunOver(first.finished.rounds_completed, first.finished.reason)
        if kind != "header":
            raise RuntimeError(f"coordinator sent {kind!r} before a task header")
        header = first.header
        specs = specs_from_proto(header.payload, MAX_DOWNLOAD_BYTES)
        assembler = PayloadAssembler(total_bytes=header.payload.total_bytes)
        for message in stream:
            if message.WhichOneof("kind") == "chunk":
                assembler.add(message.chunk)
            elif message.WhichOneof("kind") == "trailer":
                buffer = assembler.finish(message.trailer)
                return ReceivedTask(header.round, header.method, header.round_seed,
                                    decode_tensors(specs, buffer), len(buffer))
        raise RuntimeError(f"task stream for round {header.round} ended before its trailer")

    def submit(self, client_id: str, round_index: int, num_examples: int, tensors: dict[str, torch.Tensor],
               train_loss: float, train_seconds: float, local_steps: int) -> pb.SubmitReply:
        specs, buffer = encode_tensors(tensors)

        def messages() -> Iterator[pb.UpdateMessage]:
            yield pb.UpdateMessage(header=pb.UpdateHeader(
                protocol_version=PROTOCOL_VERSION, client_id=client_id, round=round_index,
                num_examples=num_examples, train_loss=train_loss, train_seconds=train_seconds,
                local_steps=local_steps, payload=specs_to_proto(specs, len(buffer))))
            for chunk in chunks_to_proto(buffer):
                yield pb.UpdateMessage(chunk=chunk)
            yield pb.UpdateMessage(trailer=trailer_to_proto(buffer))

        return self._with_retry("upload", lambda: self.stub.SubmitUpdate(messages(), timeout=600))
