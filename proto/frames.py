"""The payload's chunk messages, written and read by hand in protobuf's own wire format.

A payload crosses as 1 MiB chunks, each a ``TaskMessage`` or ``UpdateMessage`` whose ``chunk`` field
(number 2 in both) holds a ``PayloadChunk {offset = 1; data = 2}``. Through protobuf's Python API every
chunk's bytes are copied into a ``bytes`` object, into the message and into its serialized form on the
sender, and on the receiver out of gRPC's bytes into the parsed message and out of it again into a
``bytes`` object. Here the sender writes a chunk message's bytes with one copy (``chunk_frame``), and the
receiver reads the offset and a view of the data straight from gRPC's bytes (``read_chunk``).

Nothing changes on the wire: ``chunk_frame`` writes exactly what ``SerializeToString`` writes (proto3:
a zero offset and empty data are left out), and any message that is not a chunk in this canonical form
(a header, a trailer, a chunk with unknown or repeated fields) goes to protobuf's own parser, so a peer
built from the generated code alone talks to this one unchanged (tests/test_frames.py checks both ways).

``add_coordinator_servicer`` and ``FramedCoordinatorStub`` are the generated registration and stub with
these (de)serializers on the two payload streams (GetTask's replies, SubmitUpdate's requests); every
other call keeps the generated code's.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence

import grpc

from proto import federation_pb2 as pb
from proto import federation_pb2_grpc as pb_grpc

SERVICE = "subspacefl.v1.Coordinator"
CHUNK_FIELD = 2
"""The ``chunk`` field's number in TaskMessage and in UpdateMessage."""
_CHUNK_TAG = bytes([CHUNK_FIELD << 3 | 2])            # field 2, length-delimited
_OFFSET_TAG = 1 << 3 | 0                                 # PayloadChunk.offset: field 1, varint
_DATA_TAG = 2 << 3 | 2                                   # PayloadChunk.data: field 2, length-delimited
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A received chunk: its offset and a view of its bytes inside the message gRPC delivered (no copy)."""

    offset: int
    data: memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_frame(offset: int, parts: Sequence[memoryview | bytes]) -> bytes:
    """The serialized message ``{chunk: {offset, data}}`` whose data is ``parts`` laid end to end, byte for
    byte what protobuf writes, with the data copied once."""
    size = sum(len(part) for part in parts)
    inner_prefix = (bytes([_OFFSET_TAG]) + _varint(offset) if offset else b"") \
        + (bytes([_DATA_TAG]) + _varint(size) if size else b"")
    return b"".join((_CHUNK_TAG, _varint(len(inner_prefix) + size), inner_prefix, *parts))


def _read_varint(raw: memoryview, position: int, end: int) -> tuple[int, int] | None:
    """(value, next position), or None where the varint is cut off, too long or above 64 bits."""
    value = shift = 0
    for index in range(position, min(end, position + _MAX_VARINT_BYTES)):
        byte = raw[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, index + 1) if value < 1 << 64 else None
        shift += 7
    return None


def read_chunk(raw: bytes) -> ChunkView | None:
    """The chunk in ``raw`` if ``raw`` is a message holding nothing but one canonical chunk; None for anything
    else, which protobuf's parser then reads (and rejects where it is malformed)."""
    view = memoryview(raw)
    if len(view) < 2 or view[0] != _CHUNK_TAG[0]:
        return None
    header = _read_varint(view, 1, len(view))
    if header is None or header[1] + header[0] != len(view):     # exactly one field, spanning the message
        return None
    position, end = header[1], len(view)
    offset, data = 0, view[end:end]
    seen: set[int] = set()
    while position < end:
        tag = view[position]
        if tag in seen or tag not in (_OFFSET_TAG, _DATA_TAG):    # repeated or unknown fields: protobuf decides
            return None
        seen.add(tag)
        field = _read_varint(view, position + 1, end)
        if field is None:
            return None
        if tag == _OFFSET_TAG:
            offset, position = field
        else:
            length, start = field
            if start + length > end:
                return None
            data, position = view[start: start + length], start + length
    return ChunkView(offset, data)


def chunk_of(message: ChunkView | pb.TaskMessage | pb.UpdateMessage) -> ChunkView | None:
    """The chunk a received message holds (read by hand, or a chunk message parsed by protobuf); None for the
    other kinds."""
    if isinstance(message, ChunkView):
        return message
    if message.WhichOneof("kind") == "chunk":
        return ChunkView(message.chunk.offset, memoryview(message.chunk.data))
    return None


def _reader(message_type: type) -> Callable[[bytes], object]:
    """A deserializer: a ChunkView for a chunk message, else the parsed ``message_type`` (a chunk that needed
    protobuf's parser also comes back as a ChunkView, so readers see chunks in one form)."""

    def deserialize(raw: bytes) -> object:
        chunk = read_chunk(raw)
        if chunk is not None:
            return chunk
        message = message_type.FromString(raw)
        return chunk_of(message) or message

    return deserialize


def _writer(message: bytes | object) -> bytes:
    """A serializer: frames from chunk_frame pass as they are; messages are serialized by protobuf."""
    return message if isinstance(message, bytes) else message.SerializeToString()


read_task_message = _reader(pb.TaskMessage)
read_update_message = _reader(pb.UpdateMessage)


def add_coordinator_servicer(servicer: pb_grpc.CoordinatorServicer, server: grpc.Server) -> None:
    """The generated ``add_CoordinatorServicer_to_server``, with the payload streams framed by hand."""
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join, request_deserializer=pb.JoinRequest.FromString,
            response_serializer=pb.JoinReply.SerializeToString),
        "GetTask": grpc.unary_stream_rpc_method_handler(
            servicer.GetTask, request_deserializer=pb.TaskRequest.FromString, response_serializer=_writer),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.SubmitUpdate, request_deserializer=read_update_message,
            response_serializer=pb.SubmitReply.SerializeToString),
        "KeepAlive": grpc.stream_unary_rpc_method_handler(
            servicer.KeepAlive, request_deserializer=pb.Heartbeat.FromString,
            response_serializer=pb.KeepAliveReply.SerializeToString),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status, request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class FramedCoordinatorStub(pb_grpc.CoordinatorStub):
    """The generated stub, with GetTask's replies read and SubmitUpdate's chunks written by hand."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self.GetTask = channel.unary_stream(
            f"/{SERVICE}/GetTask", request_serializer=pb.TaskRequest.SerializeToString,
            response_deserializer=read_task_message, _registered_method=True)
        self.SubmitUpdate = channel.stream_unary(
            f"/{SERVICE}/SubmitUpdate", request_serializer=_writer,
            response_deserializer=pb.SubmitReply.FromString, _registered_method=True)
