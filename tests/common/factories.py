"""Random adapters and client updates for the common/ tests (seeded, float64 by default)."""

from __future__ import annotations

import torch

from common.adapter import AdapterState, ClientUpdate, LoraFactors

F64 = torch.float64

# Two layers with d != k in both directions, so per-layer shapes and cross-layer sums both matter.
DEFAULT_SHAPES: dict[str, tuple[int, int]] = {"enc.0.query": (12, 9), "enc.0.output.dense": (9, 14)}
HEAD_SHAPES: dict[str, tuple[int, ...]] = {"classifier.weight": (3, 5), "classifier.bias": (3,)}


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_state(
    gen: torch.Generator,
    shapes: dict[str, tuple[int, int]],
    rank: int,
    *,
    head: dict[str, tuple[int, ...]] | None = None,
    zero_b: bool = False,
    dtype: torch.dtype = F64,
) -> AdapterState:
    """Factors A (r, k) ~ N(0, 1/k) like PEFT's init scale, B (d, r) ~ N(0, 1) (or zero)."""
    lora = {}
    for layer, (d, k) in shapes.items():
        a = torch.randn(rank, k, generator=gen, dtype=F64) / k**0.5
        b = torch.zeros(d, rank, dtype=F64) if zero_b else torch.randn(d, rank, generator=gen, dtype=F64)
        lora[layer] = LoraFactors(A=a.to(dtype), B=b.to(dtype))
    extra = {key: torch.randn(*shape, generator=gen, dtype=F64).to(dtype) for key, shape in (head or {}).items()}
    return AdapterState(lora=lora, extra=extra)


def random_updates(
    gen: torch.Generator,
    shapes: dict[str, tuple[int, int]],
    rank: int,
    num_clients: int,
    *,
    head: dict[str, tuple[int, ...]] | None = None,
    zero_b: bool = False,
    dtype: torch.dtype = F64,
) -> list[ClientUpdate]:
    updates = []
    for i in range(num_clients):
        n = int(torch.randint(1, 100, (1,), generator=gen))
        updates.append(ClientUpdate(client=f"client-{i}", num_examples=n,
                                    state=random_state(gen, shapes, rank, head=head, zero_b=zero_b, dtype=dtype)))
    return updates


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y|| / ||y|| (absolute when y is zero)."""
    x, y = x.to(F64), y.to(F64)
    diff = float(torch.linalg.vector_norm(x - y))
    ref = float(torch.linalg.vector_norm(y))
    return diff / ref if ref > 0 else diff


def align_signs(u_test: torch.Tensor, u_ref: torch.Tensor) -> torch.Tensor:
    """Per-column sign flips (1 or -1) that align u_test's columns with u_ref's."""
    signs = torch.sign((u_test * u_ref).sum(dim=0))
    return torch.where(signs == 0, torch.ones_like(signs), signs)
