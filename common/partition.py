"""Splitting a dataset's indices over N clients (docs/DESIGN.md §4: partitioning).

- ``dirichlet_partition``: per bucket (a label, or HellaSwag's ``activity_label``), draw client
  shares from Dirichlet(alpha) and split that bucket's shuffled indices accordingly; small
  alpha gives strongly non-IID clients. If any client ends below ``min_client_size``, fall
  back to a seeded round-robin over the shuffled whole (the released behaviour), so every
  client can still train.
- ``iid_partition``: round-robin over a seeded shuffle.

Both use numpy.random.default_rng(seed): the same inputs give the same partition.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SCHEMES = ("dirichlet", "round_robin_fallback", "iid")


@dataclass
class Partition:
    """Client j trains on items ``indices[j]`` (sorted); ``scheme`` says how they were drawn."""

    indices: list[list[int]]
    scheme: str

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r}: use one of {', '.join(SCHEMES)}")

    @property
    def sizes(self) -> list[int]:
        return [len(part) for part in self.indices]


def _check_counts(num_items: int, num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients={num_clients!r}: must be a positive integer")
    if num_items < num_clients:
        raise ValueError(
            f"{num_items} items cannot give each of num_clients={num_clients} clients at least one; "
            "use fewer clients or more data"
        )


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: must be a non-negative integer such as 42")


def _round_robin(num_items: int, num_clients: int, seed: int) -> list[list[int]]:
    """Client j gets positions j, j + N, j + 2N, ... of a seeded shuffle of range(num_items)."""
    order = np.random.default_rng(seed).permutation(num_items)
    return [sorted(int(i) for i in order[j::num_clients]) for j in range(num_clients)]


def iid_partition(num_items: int, num_clients: int, seed: int) -> Partition:
    """Round-robin over a seeded shuffle: sizes differ by at most one."""
    _check_counts(num_items, num_clients)
    _check_seed(seed)
    return Partition(indices=_round_robin(num_items, num_clients, seed), scheme="iid")


def _buckets(bucket_values: Sequence[Hashable]) -> list[list[int]]:
    """Item indices per bucket value, buckets in order of first appearance (deterministic)."""
    grouped: dict[Hashable, list[int]] = {}
    for index, value in enumerate(bucket_values):
        grouped.setdefault(value, []).append(index)
    return list(grouped.values())


def dirichlet_partition(
    bucket_values: Sequence[Hashable], num_clients: int, alpha: float, min_client_size: int, seed: int
) -> Partition:
    """Per bucket b with items I_b: shares q ~ Dirichlet(alpha 1_N), client j gets the j-th slice
    of shuffled I_b cut at floor(cumsum(q) |I_b|). Falls back to a seeded round-robin over all
    items (scheme ``round_robin_fallback``) when some client has fewer than ``min_client_size``.
    """
    num_items = len(bucket_values)
    _check_counts(num_items, num_clients)
    _check_seed(seed)
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha={alpha!r}: must be a positive finite number (0.3 is strongly non-IID)")
    if isinstance(min_client_size, bool) or not isinstance(min_client_size, int) or min_client_size < 0:
        raise ValueError(f"min_client_size={min_client_size!r}: must be a non-negative integer such as 8")

    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for members in _buckets(bucket_values):
        shuffled = rng.permutation(np.asarray(members))
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))  # (N,)
        cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(int)  # N - 1 split points
        for client, piece in enumerate(np.split(shuffled, cuts)):
            parts[client].extend(int(i) for i in piece)

    smallest = min(len(p) for p in parts)
    if smallest >= min_client_size:
        return Partition(indices=[sorted(p) for p in parts], scheme="dirichlet")

    logger.warning(
        "Dirichlet(alpha=%s) left a client with %d items (< min_client_size=%d); "
        "falling back to a seeded round-robin over the shuffled data", alpha, smallest, min_client_size,
    )
    fallback = _round_robin(num_items, num_clients, seed)
    if min(len(p) for p in fallback) < min_client_size:
        logger.warning(
            "even round-robin gives %d items to some client (< min_client_size=%d): %d items for %d clients",
            min(len(p) for p in fallback), min_client_size, num_items, num_clients,
        )
    return Partition(indices=fallback, scheme="round_robin_fallback")


def partition_stats(partition: Partition, bucket_values: Sequence[Hashable]) -> dict[str, Any]:
    """JSON-serializable summary: scheme, sizes, min / max / mean size, and per client a
    histogram {str(bucket value): count} (keys sorted)."""
    num_items = len(bucket_values)
    for client, part in enumerate(partition.indices):
        for index in part:
            if not 0 <= index < num_items:
                raise ValueError(
                    f"partition client {client} holds index {index}, outside 0..{num_items - 1}; "
                    "pass the bucket values the partition was built from"
                )
    sizes = partition.sizes
    histograms = []
    for part in partition.indices:
        counts = Counter(str(bucket_values[i]) for i in part)
        histograms.append({key: int(counts[key]) for key in sorted(counts)})
    return {
        "scheme": partition.scheme,
        "num_clients": len(sizes),
        "sizes": sizes,
        "min_size": min(sizes) if sizes else 0,
        "max_size": max(sizes) if sizes else 0,
        "mean_size": float(sum(sizes) / len(sizes)) if sizes else 0.0,
        "histograms": histograms,
    }
