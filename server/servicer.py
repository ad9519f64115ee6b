"""The gRPC servicer: proto in, one domain call, proto out; domain errors become status codes."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

import torch

from common.codec import CodecError, TensorSink, TensorSpec
from proto import PROTOCOL_VERSION
from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as pb_grpc
from proto.frames import ChunkView, chunk_of
from proto.serde import PayloadAssembler, check_layout, parse_specs, payload_messages, specs_to_proto
from server.coordinator import Coordinator, RunFinished, Task
from server.rounds import UploadStats
from server.errors import BadRequest, CoordinatorError, CorruptPayload, VersionMismatch

log = logging.getLogger(__name__)


def _check_version(version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {version} is not supported; this coordinator speaks "
                              f"version {PROTOCOL_VERSION}: upgrade the client")


def _abort(context: grpc.ServicerContext, error: CoordinatorError) -> None:
    log.warning("rejected: %s", error)
    context.abort(getattr(grpc.StatusCode, error.status), str(error))


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, partition_fingerprints: list[str]) -> None:
        self.coordinator = coordinator
        self.fingerprints = partition_fingerprints

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        try:
            _check_version(request.protocol_version)
            record = self.coordinator.join(request.client_name, request.partition_index, request.device,
                                           declared_examples=request.num_examples, own_data=request.own_data,
                                           requested_rank=request.lora_rank)
        except CoordinatorError as error:
            _abort(context, error)
        return pb.JoinReply(
            protocol_version=PROTOCOL_VERSION, client_id=record.client_id,
            run_config_json=self.coordinator.config.to_json(), partition_index=record.partition,
            num_partitions=len(self.fingerprints), partition_fingerprint=self.fingerprints[record.partition],
            run_id=self.coordinator.run_id,
            heartbeat_interval_ms=int(self.coordinator.heartbeat_interval_s() * 1000), lora_rank=record.rank,
        )

    def GetTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> Iterator[pb.TaskMessage]:
        try:
            _check_version(request.protocol_version)
            task = self.coordinator.next_task(request.client_id, base_residual_round=request.base_residual_round)
        except CoordinatorError as error:
            _abort(context, error)
        if isinstance(task, RunFinished):
            self.coordinator.finished_for(request.client_id)
            yield pb.TaskMessage(finished=pb.RunFinished(rounds_completed=task.rounds_completed, reason=task.reason))
        elif isinstance(task, Task):
            yield pb.TaskMessage(header=pb.TaskHeader(
                protocol_version=PROTOCOL_VERSION, round=task.round, method=task.method, round_seed=task.round_seed,
                payload=specs_to_proto(task.specs, len(task.buffer)), base_residual_round=task.base_residual_round))
            yield from payload_messages(task.buffer, pb.TaskMessage)
        else:
            yield pb.TaskMessage(wait=pb.Wait(reason=task.reason))

    def SubmitUpdate(self, request_iterator: Iterator[pb.UpdateMessage], context: grpc.ServicerContext) -> pb.SubmitReply:
        """Header checked in full (round, claimed size, tensor names, shapes, dtypes, total size) before any
        payload byte is read; one stream per client at a time; then the payload, its digest, its values."""
        try:
            header = self._read_header(request_iterator)
            specs = parse_specs(header.payload)
            record = self.coordinator.check_upload_header(header.client_id, header.round, header.num_examples,
                                                          specs, header.payload.total_bytes)
            check_layout(specs, header.payload.total_bytes, self.coordinator.max_payload_bytes)
            with self.coordinator.upload_slot(record):
                tensors = self._receive_payload(header, specs, request_iterator)
                self.coordinator.submit(record, header.round, tensors, UploadStats(
                    train_loss=header.train_loss, train_seconds=header.train_seconds,
                    local_steps=header.local_steps, payload_bytes=header.payload.total_bytes))
        except CodecError as error:
            _abort(context, BadRequest(str(error)))
        except CoordinatorError as error:
            _abort(context, error)
        return pb.SubmitReply(message=f"round {header.round} update accepted",
                              bytes_received=header.payload.total_bytes)

    def KeepAlive(self, request_iterator: Iterator[pb.Heartbeat], context: grpc.ServicerContext) -> pb.KeepAliveReply:
        client_id = ""
        try:
            for beat in request_iterator:
                _check_version(beat.protocol_version)
                if client_id and beat.client_id != client_id:
                    raise BadRequest("a KeepAlive stream must carry one client id")
                client_id = beat.client_id
                self.coordinator.registry.get(client_id)          # unknown id: NOT_FOUND, the client rejoins
                self.coordinator.keepalive(client_id, is_open=True)
                finished = self.coordinator.finished_for(client_id)
                if finished is not None:                           # tell a client that is busy training
                    return pb.KeepAliveReply(message=finished.reason, run_over=True)
        except CoordinatorError as error:
            _abort(context, error)
        except grpc.RpcError:
            pass                                                   # the client went away mid-stream
        finally:
            if client_id:
                self.coordinator.keepalive(client_id, is_open=False)
        return pb.KeepAliveReply(message="stream closed")

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        try:
            _check_version(request.protocol_version)
        except CoordinatorError as error:
            _abort(context, error)
        status = self.coordinator.status()
        clients = [pb.ClientStatus(**vars(client)) for client in status.clients]
        return pb.StatusReply(**{**vars(status), "clients": clients})

    @staticmethod
    def _read_header(messages: Iterator[ChunkView | pb.UpdateMessage]) -> pb.UpdateHeader:
        first = next(messages, None)
        if first is None or chunk_of(first) is not None or first.WhichOneof("kind") != "header":
            raise BadRequest("an upload must start with an UpdateHeader")
        _check_version(first.header.protocol_version)
        return first.header

    @staticmethod
    def _receive_payload(header: pb.UpdateHeader, specs: list[TensorSpec],
                         messages: Iterator[ChunkView | pb.UpdateMessage]) -> dict[str, torch.Tensor]:
        """Chunks, in order, written straight into the tensors of the checked ``specs``, then the trailer with
        the digest; the tensors once it matches."""
        sink = TensorSink(specs)
        assembler = PayloadAssembler(header.payload.total_bytes, sink.write)
        for message in messages:
            try:
                chunk = chunk_of(message)
                if chunk is not None:
                    assembler.add(chunk)
                elif message.WhichOneof("kind") == "trailer":
                    assembler.finish(message.trailer)
                    return sink.tensors()
                else:
                    raise BadRequest(f"unexpected {message.WhichOneof('kind')!r} message inside an upload")
            except CodecError as error:
                raise CorruptPayload(str(error)) from None
        raise CorruptPayload(f"upload stream ended without a trailer after {assembler.received} of "
                             f"{header.payload.total_bytes} bytes (truncated)")
