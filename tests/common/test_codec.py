"""The tensor codec: bit-exact round trips and strict validation."""

import pytest
import torch

from common.codec import CodecError, TensorSpec, decode_tensors, encode_tensors, sha256, validate_specs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_round_trip_is_bit_exact(dtype):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(7, 5, generator=generator) * 1e3
    tensors = {
        "a.lora_A.weight": values.to(dtype),
        "a.lora_B.weight": torch.randn(3, generator=generator).to(dtype),
        "scalar": torch.tensor(1.5).to(dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
    }
    if dtype.is_floating_point:   # special values must survive too
        tensors["special"] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-8]).to(dtype)
    specs, buffer = encode_tensors(tensors)
    decoded = decode_tensors(specs, buffer)
    assert list(decoded) == list(tensors)
    for name, original in tensors.items():
        assert decoded[name].dtype == original.dtype and decoded[name].shape == original.shape
        # Compare raw bytes: NaN payloads and -0.0 included.
        assert decoded[name].reshape(-1).view(torch.uint8).tolist() == original.reshape(-1).view(torch.uint8).tolist()


def test_bytes_are_little_endian_raw_memory():
    specs, buffer = encode_tensors({"x": torch.tensor([1.0], dtype=torch.float32)})
    assert buffer == bytes.fromhex("0000803f")
    assert specs == [TensorSpec("x", "float32", (1,), 0, 4)]


def test_non_contiguous_input_encodes_its_values():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    specs, buffer = encode_tensors({"t": base.t()})
    assert torch.equal(decode_tensors(specs, buffer)["t"], base.t())


@pytest.mark.parametrize("spec, message", [
    (TensorSpec("x", "float32", (2,), 0, 4), "do not match shape"),
    (TensorSpec("x", "float32", (2,), 4, 8), "outside the 8-byte payload"),
    (TensorSpec("x", "complex64", (1,), 0, 8), "unsupported dtype"),
    (TensorSpec("", "float32", (2,), 0, 8), "empty name"),
    (TensorSpec("x", "float32", (-2,), 0, 8), "negative dimension"),
])
def test_invalid_specs_are_rejected_with_a_reason(spec, message):
    with pytest.raises(CodecError, match=message):
        validate_specs([spec], 8)


def test_duplicate_names_are_rejected():
    spec = TensorSpec("x", "float32", (1,), 0, 4)
    with pytest.raises(CodecError, match="appears twice"):
        validate_specs([spec, TensorSpec("x", "float32", (1,), 4, 4)], 8)


def test_digest_is_sha256():
    assert sha256(b"abc").hex().startswith("ba7816bf")


def test_decoded_tensors_own_their_memory_whatever_the_buffer_type(tmp_path):
    """Tensors that shared one buffer could not be saved (torch.save, safetensors) nor outlive a reused buffer."""
    import torch
    from safetensors.torch import save_file

    from common.codec import decode_tensors, encode_tensors

    specs, buffer = encode_tensors({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                                    "b": torch.ones(4, dtype=torch.bfloat16)})
    for given in (buffer, bytearray(buffer)):
        tensors = decode_tensors(specs, given)
        torch.save(tensors, tmp_path / "t.pt")
        save_file(tensors, str(tmp_path / "t.safetensors"))
        if isinstance(given, bytearray):
            given[:] = bytes(len(given))                  # the receiver's buffer may be reused
        assert torch.equal(tensors["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
