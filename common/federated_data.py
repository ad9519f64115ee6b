"""The data split every party agrees on: the coordinator and each client derive it
independently from the run configuration, and compare fingerprints."""

from __future__ import annotations

import hashlib
from typing import Sequence

from common.config import RunConfig
from common.partition import Partition, dirichlet_partition, iid_partition


def partition_dataset(config: RunConfig, partition_values: Sequence) -> Partition:
    """Split the training rows over num_clients clients as the config says (seeded by the run seed)."""
    data, seed = config.data, config.federation.seed
    if data.partitioning == "iid":
        return iid_partition(len(partition_values), data.num_clients, seed)
    return dirichlet_partition(partition_values, data.num_clients, data.dirichlet_alpha, data.min_client_size, seed)


def fingerprint(indices: Sequence[int]) -> str:
    """SHA-256 hex of one partition's example indices."""
    return hashlib.sha256(",".join(str(int(i)) for i in indices).encode()).hexdigest()
