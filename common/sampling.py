"""Which clients train in a round (docs/DESIGN.md §4: client sampling).

The draw depends only on (seed, round index, number of partitions, seeding scheme), never on who
joined first or on any global random state, so a restarted coordinator samples the same clients and a
sweep over seeds is reproducible.

Two seeding schemes (``sampling_seeds:`` in the config, common/config.py ``SAMPLING_SEED_SCHEMES``):

* ``independent`` (the default): round t's generator is seeded from the pair (seed, t) through
  ``numpy.random.SeedSequence``, so the sequences of seeds 42 and 43 are unrelated draws and a sweep
  over seeds averages over genuinely different client schedules.
* ``seed_plus_round``: the generator is seeded with seed + t, the reference study's scheme. Seed 43's
  round t then samples exactly what seed 42's round t + 1 samples, so neighbouring seeds share most of
  their schedule; kept for bit-exact reproduction of the study.

Both feed the same ``torch.Generator`` + ``torch.randperm`` draw; only the generator's seed differs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from common.config import SAMPLING_SEED_SCHEMES

logger = logging.getLogger(__name__)

_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed accepts any non-negative int64


def _check_int(name: str, value: object, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}; {fix}")
    return value


def _independent_seed(seed: int, round_index: int) -> int:
    """A non-negative int64 derived from the pair (seed, round_index) by numpy's SeedSequence.

    SeedSequence hashes its whole entropy list, so (42, t + 1) and (43, t) give unrelated seeds,
    unlike seed + t. Two 32-bit words make 64 bits; the top bit is dropped to stay within int64.
    """
    low, high = np.random.SeedSequence([seed, round_index]).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) & _MAX_SEED


def _generator_seed(seed: int, round_index: int, scheme: str) -> int:
    """The torch.Generator seed of round ``round_index`` under ``scheme``."""
    if scheme == "independent":
        return _independent_seed(seed, round_index)
    if scheme == "seed_plus_round":
        if seed + round_index > _MAX_SEED:
            raise ValueError(f"seed + round_index = {seed + round_index} exceeds {_MAX_SEED}; use a smaller seed")
        return seed + round_index
    raise ValueError(f"scheme={scheme!r}: unknown client-sampling seed scheme; use one of "
                     f"{', '.join(SAMPLING_SEED_SCHEMES)} (the config key sampling_seeds)")


def sample_clients(num_clients: int, clients_per_round: int, seed: int, round_index: int,
                   scheme: str = "independent") -> list[int]:
    """Sorted partition indices for round ``round_index``: ``clients_per_round`` of range(num_clients),
    drawn without replacement by ``torch.randperm`` under a torch.Generator whose seed ``scheme`` derives
    from (seed, round_index): ``independent`` (SeedSequence of the pair) or ``seed_plus_round`` (their sum).
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
    generator = torch.Generator(device="cpu").manual_seed(_generator_seed(seed, round_index, scheme))
    order = torch.randperm(num_clients, generator=generator)  # (num_clients,)
    chosen = sorted(int(i) for i in order[:clients_per_round])
    logger.debug("round %d (%s): sampled partitions %s of %d", round_index, scheme, chosen, num_clients)
    return chosen
