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


def tensor_pieces(tensors: dict[str, torch.Tensor]) -> tuple[list[TensorSpec], list[memoryview]]:
    """The specs of the tensors laid end to end, in the dict's order, and each tensor's little-endian bytes
    as a view of its own memory (no copy for contiguous tensors on a little-endian machine): what a sender
    cuts into chunks without first joining them into one buffer."""
    specs: list[TensorSpec] = []
    pieces: list[memoryview] = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise CodecError(f"tensor {name!r} has dtype {tensor.dtype}; supported: {', '.join(DTYPES)}")
        data = _little_endian_view(tensor)
        specs.append(TensorSpec(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), offset, data.nbytes))
        pieces.append(memoryview(data))
        offset += data.nbytes
    return specs, pieces


def encode_tensors(tensors: dict[str, torch.Tensor]) -> tuple[list[TensorSpec], bytes]:
    """Lay the tensors end to end in one buffer, in the dict's order."""
    specs, pieces = tensor_pieces(tensors)
    return specs, b"".join(pieces)          # the one copy: join reads each tensor's memory in place


class TensorSink:
    """Tensors allocated from a payload's checked specs, written in place as its bytes arrive: a receiver
    copies each byte once, from the message gRPC delivered straight into the tensor that keeps it, instead
    of into a payload buffer and then out of it again (``decode_tensors``). ``specs`` must tile the payload
    (proto/serde.py's check_layout); every tensor owns its memory."""

    def __init__(self, specs: list[TensorSpec]) -> None:
        self._specs = specs
        self._tensors = {spec.name: torch.empty(spec.shape, dtype=DTYPES[spec.dtype]) for spec in specs}
        ordered = sorted(specs, key=lambda spec: spec.offset)
        self._starts = [spec.offset for spec in ordered]
        self._views = [memoryview(self._tensors[spec.name].reshape(-1).view(torch.uint8).numpy()) for spec in ordered]
        self._index = 0                               # the tensor the next byte goes to (bytes arrive in order)

    def write(self, offset: int, data: memoryview | bytes) -> None:
        """Copy ``data``, the payload's bytes from ``offset`` on, into the tensors it covers. Writes come in
        order without gaps (the assembler checks offsets)."""
        data = memoryview(data)
        while len(data):
            while self._starts[self._index] + len(self._views[self._index]) <= offset:
                self._index += 1                      # past this tensor (or an empty one)
            start = offset - self._starts[self._index]
            size = min(len(data), len(self._views[self._index]) - start)
            self._views[self._index][start: start + size] = data[:size]
            data, offset = data[size:], offset + size

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, in the specs' order, once every byte has been written."""
        if _BIG_ENDIAN:
            for spec in self._specs:
                tensor = self._tensors[spec.name]
                if tensor.numel() and tensor.element_size() > 1:
                    raw = tensor.reshape(-1).view(torch.uint8).view(-1, tensor.element_size()).flip(1)
                    self._tensors[spec.name] = raw.contiguous().view(tensor.dtype).reshape(spec.shape)
        return {spec.name: self._tensors[spec.name] for spec in self._specs}


def decode_tensors(specs: list[TensorSpec], buffer: bytes | bytearray) -> dict[str, torch.Tensor]:
    """Inverse of encode_tensors; validates every spec against the buffer first. Every tensor is a copy that
    owns its memory (torch.save and safetensors refuse tensors that share one buffer); a ``bytearray`` is read
    in place, ``bytes`` are copied into one first. (A receiver on the wire writes into a TensorSink instead.)"""
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
