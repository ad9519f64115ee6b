"""A payload cut into chunk messages and put back together (proto/serde.py, common/codec.py's TensorSink):
bit-exact, byte for byte the old protobuf path's messages, digest checked."""

import pytest
import torch

from common.codec import CodecError, TensorSink, encode_tensors, sha256, tensor_pieces
from proto import federation_pb2 as pb
from proto.frames import read_update_message
from proto.serde import PayloadAssembler, check_layout, chunks_to_proto, payload_messages


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.lora_A.weight": torch.randn(8, 300, generator=generator),                    # straddles chunks
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "half": torch.randn(17, generator=generator).to(torch.bfloat16),
        "special": torch.tensor([float("nan"), float("inf"), -0.0]),
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),         # not contiguous
        "last": torch.randn(1000, generator=generator).to(torch.float16),
    }


def _frames(tensors, chunk_bytes, monkeypatch):
    monkeypatch.setattr("proto.serde.CHUNK_BYTES", chunk_bytes)
    specs, pieces = tensor_pieces(tensors)
    return specs, [m if isinstance(m, bytes) else m.SerializeToString()
                   for m in payload_messages(pieces, pb.UpdateMessage)]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1000, 4096, 1 << 20])
def test_pieces_stream_and_reassemble_bit_exact(chunk_bytes, monkeypatch):
    tensors = _tensors()
    specs, frames = _frames(tensors, chunk_bytes, monkeypatch)
    _, buffer = encode_tensors(tensors)
    # Byte for byte the messages the protobuf path writes for the same buffer.
    expected = [pb.UpdateMessage(chunk=chunk).SerializeToString() for chunk in chunks_to_proto_sized(buffer, chunk_bytes)]
    assert frames[:-1] == expected
    assert pb.UpdateMessage.FromString(frames[-1]).trailer.sha256 == sha256(buffer)

    check_layout(specs, len(buffer), len(buffer))
    sink = TensorSink(specs)
    assembler = PayloadAssembler(len(buffer), sink.write)
    for frame in frames[:-1]:
        assembler.add(read_update_message(frame))
    assembler.finish(read_update_message(frames[-1]).trailer)
    received = sink.tensors()
    assert list(received) == list(tensors)
    for name, original in tensors.items():
        assert received[name].dtype == original.dtype and received[name].shape == original.shape
        assert received[name].contiguous().reshape(-1).view(torch.uint8).tolist() == \
            original.contiguous().reshape(-1).view(torch.uint8).tolist()
        assert received[name].untyped_storage().nbytes() == original.numel() * original.element_size()   # owns its memory


def chunks_to_proto_sized(buffer: bytes, size: int):
    return [pb.PayloadChunk(offset=offset, data=buffer[offset: offset + size]) for offset in range(0, len(buffer), size)]


def test_the_default_chunks_match_chunks_to_proto():
    tensors = {"x": torch.randn(300_000)}
    specs, pieces = tensor_pieces(tensors)
    frames = list(payload_messages(pieces, pb.TaskMessage))
    _, buffer = encode_tensors(tensors)
    assert frames[:-1] == [pb.TaskMessage(chunk=c).SerializeToString() for c in chunks_to_proto(buffer)]


def test_a_wrong_digest_or_a_short_payload_is_refused():
    buffer = bytes(range(200)) * 50
    received = bytearray(len(buffer))

    def write(offset, data):
        received[offset: offset + len(data)] = data

    assembler = PayloadAssembler(len(buffer), write)
    with pytest.raises(CodecError, match="truncated: received 0 of 10000"):
        assembler.finish(pb.PayloadTrailer(sha256=sha256(buffer)))
    for chunk in chunks_to_proto_sized(buffer, 999):
        assembler.add(chunk)
    with pytest.raises(CodecError, match="digest mismatch"):
        assembler.finish(pb.PayloadTrailer(sha256=b"\x00" * 32))
    assembler.finish(pb.PayloadTrailer(sha256=sha256(buffer)))
    assert received == buffer


def test_sink_writes_across_tensor_boundaries_in_any_split():
    tensors = {"a": torch.arange(5, dtype=torch.int64), "e": torch.zeros(0), "b": torch.arange(3, dtype=torch.float32)}
    specs, buffer = encode_tensors(tensors)
    for split in range(len(buffer) + 1):
        sink = TensorSink(specs)
        sink.write(0, buffer[:split])
        sink.write(split, buffer[split:])
        out = sink.tensors()
        assert all(torch.equal(out[name], tensors[name]) for name in tensors)
