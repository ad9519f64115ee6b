"""Conversions between the codec's plain values and protobuf messages, plus chunking.

Symmetric pairs (``x_to_proto`` / ``x_from_proto``); the server's servicer and
the client's connection both use them, so a payload is cut and reassembled in
exactly one way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from common.codec import CodecError, TensorSpec, sha256, validate_specs
from proto import federation_pb2 as pb
from proto.frames import ChunkView, chunk_frame

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


def _cut(pieces: Sequence[memoryview], size: int) -> Iterator[tuple[int, list[memoryview]]]:
    """The bytes of ``pieces`` laid end to end, as (offset, the views that make up the next ``size`` bytes)."""
    offset, parts, filled = 0, [], 0
    for piece in pieces:
        while len(piece):
            take = piece[: size - filled]
            parts.append(take)
            filled += len(take)
            piece = piece[len(take):]
            if filled == size:
                yield offset, parts
                offset, parts, filled = offset + size, [], 0
    if parts:
        yield offset, parts


def payload_messages(payload: bytes | bytearray | Sequence[memoryview], message_type: type[M]) -> Iterator[M | bytes]:
    """A payload (one buffer, or the pieces of common/codec.py's tensor_pieces, laid end to end) as
    ``message_type`` messages (TaskMessage, UpdateMessage): its 1 MiB chunks, each serialized by hand with one
    copy (proto/frames.py), then the trailer with the SHA-256 of the whole payload. The digest is computed on
    each chunk's data right after its frame is written, while it is still in cache."""
    pieces = [memoryview(payload)] if isinstance(payload, (bytes, bytearray)) else payload
    hasher = hashlib.sha256()
    for offset, parts in _cut(pieces, CHUNK_BYTES):
        frame = chunk_frame(offset, parts)
        hasher.update(memoryview(frame)[len(frame) - sum(len(part) for part in parts):])
        yield frame
    yield message_type(trailer={"sha256": hasher.digest()})


def chunks_to_proto(buffer: bytes) -> Iterator[pb.PayloadChunk]:
    view = memoryview(buffer)
    for offset in range(0, len(buffer), CHUNK_BYTES):
        yield pb.PayloadChunk(offset=offset, data=bytes(view[offset: offset + CHUNK_BYTES]))


def trailer_to_proto(buffer: bytes) -> pb.PayloadTrailer:
    return pb.PayloadTrailer(sha256=sha256(buffer))


class PayloadAssembler:
    """Reassembles a payload from chunks, in order, and checks its length and digest.

    ``total_bytes`` must have passed ``check_layout`` (a size the receiver accepts). Each chunk is copied
    once, as it arrives, by ``write(offset, data)`` (common/codec.py's TensorSink: straight into the tensors
    that keep it), and hashed right after, while its bytes are still in cache. (Hashing on a thread of its own, overlapped with
    receiving, cost more CPU and wall time on a 2-core machine: 131 against 112 ms a round trip of the
    RoBERTa-large payload, bench/transport.py.)"""

    def __init__(self, total_bytes: int, write: Callable[[int, memoryview], None]) -> None:
        self.total_bytes = total_bytes
        self._write = write
        self._received = 0
        self._digest = hashlib.sha256()

    def add(self, chunk: ChunkView | pb.PayloadChunk) -> None:
        size = len(chunk.data)
        if chunk.offset != self._received:
            raise CodecError(f"chunk at offset {chunk.offset} arrived, expected offset {self._received}")
        if size > CHUNK_BYTES:
            raise CodecError(f"chunk of {size} bytes exceeds the {CHUNK_BYTES}-byte chunk size")
        if self._received + size > self.total_bytes:
            raise CodecError(f"chunks exceed the declared payload size of {self.total_bytes} bytes")
        data = memoryview(chunk.data)
        self._write(self._received, data)
        self._digest.update(data)                  # the chunk's bytes, just read: still in cache
        self._received += size

    def finish(self, trailer: pb.PayloadTrailer) -> None:
        """Checks the length and the digest."""
        if self._received != self.total_bytes:
            raise CodecError(f"payload truncated: received {self._received} of {self.total_bytes} bytes")
        if trailer.sha256 != self._digest.digest():
            raise CodecError("payload digest mismatch: the SHA-256 of the received bytes differs from the trailer's")

    @property
    def received(self) -> int:
        return self._received
