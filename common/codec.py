"""Tensor codec: named tensors <-> (specs, one contiguous little-endian byte buffer).

Transport-free: building protobuf messages out of specs and chunks is the
transport's job (proto/serde.py). Bytes are the tensors' raw memory, so a
round trip is bit-exact for every dtype, bf16 included; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import numpy as np
import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
_BIG_ENDIAN = sys.byteorder != "little"


class CodecError(ValueError):
    """A payload does not describe valid tensors."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str          # a key of DTYPES
    shape: tuple[int, ...]
    offset: int         # first byte in the buffer
    nbytes: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def _little_endian_view(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a contiguous uint8 array, little-endian; no copy where none is needed."""
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()  # 0-d tensors cannot be viewed
    if _BIG_ENDIAN and tensor.element_size() > 1:
        raw = np.ascontiguousarray(raw.reshape(-1, tensor.element_size())[:, ::-1]).reshape(-1)
    return raw


def encode_tensors(tensors: dict[str, torch.Tensor]) -> tuple[list[TensorSpec], bytes]:
    """Lay the tensors end to end in one buffer, in the dict's order."""
    specs: list[TensorSpec] = []
    parts: list[np.ndarray] = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise CodecError(f"tensor {name!r} has dtype {tensor.dtype}; supported: {', '.join(DTYPES)}")
        data = _little_endian_view(tensor)
        specs.append(TensorSpec(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), offset, data.nbytes))
        parts.append(data)
        offset += data.nbytes
    return specs, b"".join(parts)          # the one copy: join reads each tensor's memory in place


def decode_tensors(specs: list[TensorSpec], buffer: bytes | bytearray) -> dict[str, torch.Tensor]:
    """Inverse of encode_tensors; validates every spec against the buffer first. Every tensor is a copy that
    owns its memory (torch.save and safetensors refuse tensors that share one buffer); a ``bytearray`` (what
    proto/serde.py's PayloadAssembler returns) is read in place, ``bytes`` are copied into one first."""
    validate_specs(specs, len(buffer))
    if not len(buffer):
        backing = torch.empty(0, dtype=torch.uint8)
    else:
        backing = torch.frombuffer(buffer if isinstance(buffer, bytearray) else bytearray(buffer), dtype=torch.uint8)
    tensors: dict[str, torch.Tensor] = {}
    for spec in specs:
        dtype = DTYPES[spec.dtype]
        # A copy starts at an aligned address whatever the offset, and owns its memory.
        raw = backing[spec.offset: spec.offset + spec.nbytes].clone()
        if _BIG_ENDIAN and raw.numel() and dtype.itemsize > 1:
            raw = raw.view(-1, dtype.itemsize).flip(1).contiguous().view(-1)
        tensors[spec.name] = raw.view(dtype).reshape(spec.shape)
    return tensors


def validate_specs(specs: list[TensorSpec], buffer_size: int) -> None:
    """Names unique, dtypes known, sizes consistent with shapes, ranges inside the buffer."""
    seen: set[str] = set()
    for spec in specs:
        if not spec.name:
            raise CodecError("a tensor spec has an empty name")
        if spec.name in seen:
            raise CodecError(f"tensor {spec.name!r} appears twice in the payload")
        seen.add(spec.name)
        if spec.dtype not in DTYPES:
            raise CodecError(f"tensor {spec.name!r} has unsupported dtype {spec.dtype!r}; supported: {', '.join(DTYPES)}")
        if any(size < 0 for size in spec.shape):
            raise CodecError(f"tensor {spec.name!r} has a negative dimension in shape {list(spec.shape)}")
        expected = spec.numel * DTYPES[spec.dtype].itemsize
        if spec.nbytes != expected:
            raise CodecError(f"tensor {spec.name!r}: {spec.nbytes} bytes do not match shape {list(spec.shape)} "
                             f"of {spec.dtype} ({expected} bytes)")
        if spec.offset < 0 or spec.offset + spec.nbytes > buffer_size:
            raise CodecError(f"tensor {spec.name!r} lies at bytes [{spec.offset}, {spec.offset + spec.nbytes}) "
                             f"outside the {buffer_size}-byte payload")


def sha256(buffer: bytes | bytearray) -> bytes:
    return hashlib.sha256(buffer).digest()
