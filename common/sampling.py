"""Which clients train in a round (docs/DESIGN.md §4: client sampling).

The draw depends only on (seed, round index, number of partitions), never on who joined
first or on any global random state, so a restarted coordinator samples the same clients
and a sweep over seeds is reproducible.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts any non-negative int64


def _check_int(name: str, value: object, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}; {fix}")
    return value


def sample_clients(num_clients: int, clients_per_round: int, seed: int, round_index: int) -> list[int]:
    """Sorted partition indices for round ``round_index``: ``clients_per_round`` of range(num_clients),
    drawn without replacement by a torch.Generator seeded with seed + round_index.
    """
    _check_int("num_clients", num_clients, 1, "the federation needs at least one client")
    _check_int("clients_per_round", clients_per_round, 1, "use ceil(num_clients * client_fraction)")
    if clients_per_round > num_clients:
        raise ValueError(
            f"clients_per_round={clients_per_round} exceeds num_clients={num_clients}; "
            "lower client_fraction or add clients"
        )
    _check_int("seed", seed, 0, "use a non-negative seed such as 42")
    _check_int("round_index", round_index, 0, "rounds are numbered from 0")
    if seed + round_index > _MAX_SEED:
        raise ValueError(f"seed + round_index = {seed + round_index} exceeds {_MAX_SEED}; use a smaller seed")
    generator = torch.Generator(device="cpu").manual_seed(seed + round_index)
    order = torch.randperm(num_clients, generator=generator)  # (num_clients,)
    chosen = sorted(int(i) for i in order[:clients_per_round])
    logger.debug("round %d: sampled partitions %s of %d", round_index, chosen, num_clients)
    return chosen
