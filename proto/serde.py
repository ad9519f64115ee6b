"""Conversions between the codec's plain values and protobuf messages, plus chunking.

Symmetric pairs (``x_to_proto`` / ``x_from_proto``); the server's servicer and
the client's connection both use them, so a payload is cut and reassembled in
exactly one way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from common.codec import CodecError, TensorSpec, sha256, validate_specs
from proto import federation_pb2 as pb

M = TypeVar("M", pb.TaskMessage, pb.UpdateMessage)

CHUNK_BYTES = 1 << 20
"""Largest data field of one PayloadChunk: 1 MiB, far below gRPC's 4 MiB message limit."""

_DTYPE_TO_PROTO = {
    "float32": pb.FLOAT32, "float16": pb.FLOAT16, "bfloat16": pb.BFLOAT16,
    "float64": pb.FLOAT64, "int64": pb.INT64,
}
_DTYPE_FROM_PROTO = {value: name for name, value in _DTYPE_TO_PROTO.items()}


def specs_to_proto(specs: list[TensorSpec], total_bytes: int) -> pb.PayloadHeader:
    return pb.PayloadHeader(
        tensors=[pb.TensorSpec(name=s.name, dtype=_DTYPE_TO_PROTO[s.dtype], shape=list(s.shape),
                               offset=s.offset, nbytes=s.nbytes) for s in specs],
        total_bytes=total_bytes,
    )


def parse_specs(header: pb.PayloadHeader) -> list[TensorSpec]:
    """The tensor specs alone (dtype codes resolved), for a receiver that checks them against what it
    expects before it looks at sizes and offsets."""
    specs = []
    for t in header.tensors:
        if t.dtype not in _DTYPE_FROM_PROTO:
            raise CodecError(f"tensor {t.name!r} has unsupported dtype code {t.dtype}")
        specs.append(TensorSpec(t.name, _DTYPE_FROM_PROTO[t.dtype], tuple(t.shape), t.offset, t.nbytes))
    return specs


def check_layout(specs: list[TensorSpec], total_bytes: int, max_bytes: int) -> None:
    """Total size within the limit; specs consistent with their shapes and tiling the buffer exactly."""
    if total_bytes > max_bytes:
        raise CodecError(f"payload of {total_bytes} bytes exceeds the limit of {max_bytes} bytes")
    validate_specs(specs, total_bytes)
    end = 0
    for spec in sorted(specs, key=lambda s: s.offset):
        if spec.offset != end:
            raise CodecError(f"tensor {spec.name!r} starts at byte {spec.offset}, expected {end}: "
                             f"tensors must tile the payload without gaps or overlaps")
        end = spec.offset + spec.nbytes
    if end != total_bytes:
        raise CodecError(f"tensors cover {end} bytes but the payload declares {total_bytes}")


def payload_messages(buffer: bytes | bytearray, message_type: type[M]) -> Iterator[M]:
    """A payload as ``message_type`` messages (TaskMessage, UpdateMessage): its 1 MiB chunks, then the trailer
    with the SHA-256 of the whole buffer, hashed chunk by chunk as they go out, so hashing overlaps sending.
    Each chunk is built inside its message (a PayloadChunk built apart would be copied in again)."""
    digest = hashlib.sha256()
    view = memoryview(buffer)
    for offset in range(0, len(buffer), CHUNK_BYTES):
        data = view[offset: offset + CHUNK_BYTES]
        digest.update(data)
        yield message_type(chunk={"offset": offset, "data": bytes(data)})
    yield message_type(trailer={"sha256": digest.digest()})


def chunks_to_proto(buffer: bytes) -> Iterator[pb.PayloadChunk]:
    view = memoryview(buffer)
    for offset in range(0, len(buffer), CHUNK_BYTES):
        yield pb.PayloadChunk(offset=offset, data=bytes(view[offset: offset + CHUNK_BYTES]))


def trailer_to_proto(buffer: bytes) -> pb.PayloadTrailer:
    return pb.PayloadTrailer(sha256=sha256(buffer))


@dataclass
class PayloadAssembler:
    """Reassembles a buffer from chunks, in order, and checks its length and digest.

    ``total_bytes`` must have passed ``check_layout`` (a size the receiver accepts): the buffer is allocated
    at that size up front, each chunk is copied in once and hashed as it arrives, and ``finish`` hands the
    buffer itself over (common/codec.py's decode_tensors then decodes it without another copy)."""

    total_bytes: int

    def __post_init__(self) -> None:
        self._buffer = bytearray(self.total_bytes)
        self._received = 0
        self._digest = hashlib.sha256()

    def add(self, chunk: pb.PayloadChunk) -> None:
        size = len(chunk.data)
        if chunk.offset != self._received:
            raise CodecError(f"chunk at offset {chunk.offset} arrived, expected offset {self._received}")
        if size > CHUNK_BYTES:
            raise CodecError(f"chunk of {size} bytes exceeds the {CHUNK_BYTES}-byte chunk size")
        if self._received + size > self.total_bytes:
            raise CodecError(f"chunks exceed the declared payload size of {self.total_bytes} bytes")
        self._buffer[self._received: self._received + size] = chunk.data
        self._digest.update(chunk.data)
        self._received += size

    def finish(self, trailer: pb.PayloadTrailer) -> bytearray:
        if self._received != self.total_bytes:
            raise CodecError(f"payload truncated: received {self._received} of {self.total_bytes} bytes")
        if trailer.sha256 != self._digest.digest():
            raise CodecError("payload digest mismatch: the SHA-256 of the received bytes differs from the trailer's")
        return self._buffer

    @property
    def received(self) -> int:
        return self._received
