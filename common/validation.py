"""What a receiver expects of a payload, checked in two steps: the specs before any payload byte is read,
the values once the payload is whole.

Both sides use it: the coordinator on every upload, a client on every task. The
first step costs nothing but the header, so a hostile or broken peer cannot make
the receiver buffer a payload that was never going to be accepted; the second
refuses non-finite values (and, for uploads, implausible norms) before they can
reach training or aggregation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from common.codec import DTYPES, TensorSpec

WIRE_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
"""Dtypes a factor may travel in; the receiver computes in float32 (float64 for the server's math)."""
_WIRE_TORCH_DTYPES = frozenset(DTYPES[name] for name in WIRE_FLOAT_DTYPES)


@dataclass(frozen=True)
class AtMost:
    """A dimension whose size varies from payload to payload, up to ``limit`` (a base-weight residual's rank)."""

    limit: int


Shape = tuple["int | AtMost", ...]


def _fits(actual: tuple[int, ...], expected: Shape) -> bool:
    return len(actual) == len(expected) and all(
        (0 <= size <= dim.limit) if isinstance(dim, AtMost) else size == dim for size, dim in zip(actual, expected))


def _show(shape: Shape) -> str:
    return "[" + ", ".join(f"<= {d.limit}" if isinstance(d, AtMost) else str(d) for d in shape) + "]"


class PayloadRejected(ValueError):
    """A payload does not hold the tensors the receiver expects; the message names the tensor and the fix."""


def _names(items: list[str]) -> str:
    return f"{items[:3]}{'...' if len(items) > 3 else ''}"


@dataclass(frozen=True)
class ExpectedTensors:
    """The tensors a payload must hold (``required``) and may hold (``optional``), by name and shape (a
    dimension given as ``AtMost(n)`` may have any size up to n)."""

    required: dict[str, Shape]
    optional: dict[str, Shape] = field(default_factory=dict)

    @classmethod
    def like(cls, tensors: dict[str, torch.Tensor]) -> "ExpectedTensors":
        return cls({name: tuple(t.shape) for name, t in tensors.items()})

    @property
    def max_bytes(self) -> int:
        """The largest valid payload: every tensor present, in float32 (the widest wire dtype)."""
        shapes = [*self.required.values(), *self.optional.values()]
        return sum(4 * _numel(shape) for shape in shapes)

    def check_specs(self, specs: list[TensorSpec], sender: str) -> None:
        """Names, shapes and dtypes from the header alone, before any payload byte is read."""
        names = {spec.name for spec in specs}
        missing = sorted(self.required.keys() - names)
        unexpected = sorted(names - self.required.keys() - self.optional.keys())
        if missing or unexpected:
            raise PayloadRejected(f"payload from {sender} has the wrong tensors: missing {_names(missing)}, "
                                  f"unexpected {_names(unexpected)}")
        for spec in specs:
            shape = self.required.get(spec.name, self.optional.get(spec.name))
            if not _fits(tuple(spec.shape), shape):
                raise PayloadRejected(f"payload from {sender}: tensor {spec.name!r} has shape {list(spec.shape)}, "
                                      f"expected {_show(shape)}")
            if spec.dtype not in WIRE_FLOAT_DTYPES:
                raise PayloadRejected(f"payload from {sender}: tensor {spec.name!r} has dtype {spec.dtype}; "
                                      f"send {', '.join(WIRE_FLOAT_DTYPES)}")

    def check_values(self, tensors: dict[str, torch.Tensor], sender: str,
                     max_norm: float | None = None) -> dict[str, torch.Tensor]:
        """Every tensor finite (and within ``max_norm``); returns them as float32. Run check_specs first."""
        checked: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if tensor.dtype not in _WIRE_TORCH_DTYPES:
                raise PayloadRejected(f"payload from {sender}: tensor {name!r} has dtype {tensor.dtype}; "
                                      f"send {', '.join(WIRE_FLOAT_DTYPES)}")
            value = tensor.to(torch.float32)
            norm = _norm(value, max_norm)
            if not math.isfinite(norm):
                raise PayloadRejected(f"payload from {sender}: tensor {name!r} contains NaN or Inf")
            if max_norm is not None:
                if norm > max_norm:
                    raise PayloadRejected(f"payload from {sender}: tensor {name!r} has norm {norm:.4g} above "
                                          f"max_update_norm={max_norm} (raise it in the config if this is legitimate)")
            checked[name] = value
        return checked


NORM_MARGIN = 1e-3
"""Relative distance from max_norm within which the float32 norm is not trusted to decide (its rounding
error is below 1e-6 relative for any payload size a receiver accepts)."""


def _norm(value: torch.Tensor, max_norm: float | None) -> float:
    """The tensor's 2-norm, exact enough to decide what check_values decides: one float32 pass (no float64 copy
    of the tensor), and the float64 norm where that pass cannot decide. The float64 sum of float32 squares
    cannot overflow, so it is finite exactly when every entry is; the float32 one is finite only if the float64
    one is, and overflows above 1.8e19, where the float64 pass then tells overflow from Inf and NaN."""
    norm = float(torch.linalg.vector_norm(value))
    near_bound = max_norm is not None and abs(norm - max_norm) <= NORM_MARGIN * max_norm
    if math.isfinite(norm) and not near_bound:
        return norm
    return float(torch.linalg.vector_norm(value, dtype=torch.float64))


def _numel(shape: Shape) -> int:
    count = 1
    for size in shape:
        count *= size.limit if isinstance(size, AtMost) else size
    return count
