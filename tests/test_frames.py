"""Chunk messages written and read by hand (proto/frames.py): the same bytes as protobuf's, both ways."""

import pytest

from proto import federation_pb2 as pb
from proto.frames import ChunkView, chunk_frame, chunk_of, read_chunk, read_task_message, read_update_message

SIZES = [0, 1, 127, 128, 300, 16_383, 16_384, (1 << 20) - 1, 1 << 20]
OFFSETS = [0, 1, 127, 128, 1 << 20, 14_221_312, (1 << 40) + 3, (1 << 64) - 1]


@pytest.mark.parametrize("message_type", [pb.TaskMessage, pb.UpdateMessage])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("size", SIZES)
def test_a_frame_is_what_protobuf_writes_and_reads_back(message_type, offset, size):
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    parts = [memoryview(data)[: size // 3], memoryview(data)[size // 3:]]      # a chunk made of two pieces
    frame = chunk_frame(offset, parts)
    assert frame == message_type(chunk=pb.PayloadChunk(offset=offset, data=data)).SerializeToString()
    parsed = message_type.FromString(frame)                     # a peer with the generated code alone
    assert (parsed.chunk.offset, parsed.chunk.data) == (offset, data)
    chunk = read_chunk(frame)
    assert (chunk.offset, bytes(chunk.data)) == (offset, data)


def test_reading_a_chunk_does_not_copy_its_bytes():
    frame = chunk_frame(5, [b"abcdef"])
    chunk = read_chunk(frame)
    assert chunk.data.obj is frame


@pytest.mark.parametrize("reader, message_type", [(read_task_message, pb.TaskMessage),
                                                  (read_update_message, pb.UpdateMessage)])
def test_other_messages_go_to_protobuf(reader, message_type):
    trailer = message_type(trailer=pb.PayloadTrailer(sha256=b"\x01" * 32))
    assert reader(trailer.SerializeToString()) == trailer
    empty = message_type()
    assert reader(empty.SerializeToString()) == empty


def _field(number: int, wire: int, body: bytes) -> bytes:
    return bytes([number << 3 | wire]) + body


def _chunk(inner: bytes) -> bytes:
    """A message whose chunk field (2) holds ``inner``, hand-written (all test bodies are under 128 bytes)."""
    return _field(2, 2, bytes([len(inner)]) + inner)


@pytest.mark.parametrize("raw, offset, data", [
    # fields in the other order
    (_chunk(_field(2, 2, b"\x03abc") + _field(1, 0, b"\x07")), 7, b"abc"),
    # a repeated offset: the last one wins
    (_chunk(_field(1, 0, b"\x07") + _field(1, 0, b"\x08")), 8, b""),
    # an unknown field inside the chunk is skipped
    (_chunk(_field(1, 0, b"\x02") + _field(3, 2, b"\x02zz")), 2, b""),
    # the chunk field twice: protobuf merges the two
    (_chunk(_field(1, 0, b"\x05")) + _chunk(_field(2, 2, b"\x01q")), 5, b"q"),
])
def test_non_canonical_chunks_are_read_as_protobuf_reads_them(raw, offset, data):
    reference = pb.UpdateMessage.FromString(raw)
    assert (reference.chunk.offset, reference.chunk.data) == (offset, data)
    chunk = read_update_message(raw)
    assert isinstance(chunk, ChunkView) and (chunk.offset, bytes(chunk.data)) == (offset, data)


@pytest.mark.parametrize("raw", [
    b"\x12",                              # cut before the length
    b"\x12\x05\x08\x01",                  # shorter than its length
    b"\x12\x04\x12\x09abc",               # data longer than the message
    b"\x12\x0b\x08" + b"\xff" * 10,      # varint of 11 bytes
])
def test_malformed_chunks_are_refused_by_protobuf(raw):
    assert read_chunk(raw) is None
    with pytest.raises(Exception, match="(?i)error|pars|truncat"):
        read_update_message(raw)


def test_chunk_of_accepts_both_forms():
    message = pb.TaskMessage(chunk=pb.PayloadChunk(offset=3, data=b"xy"))
    assert (chunk_of(message).offset, bytes(chunk_of(message).data)) == (3, b"xy")
    assert chunk_of(pb.TaskMessage(wait=pb.Wait(reason="r"))) is None
    view = ChunkView(1, memoryview(b"z"))
    assert chunk_of(view) is view
