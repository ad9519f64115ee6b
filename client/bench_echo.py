"""Benchmark only (``python -m client --bench-echo``): a client that trains nothing.

It stands in for client/trainer.py's LocalTrainer in a run whose config sets ``synthetic_layout``
(common/synthetic.py): no model, no data. Each task goes through the method as a real client's would
(``local_objective`` gives the adapter to start from and which factors train, ``upload`` what goes back),
and the trained factors are the received ones plus seeded noise, so the coordinator aggregates, measures and
checkpoints a real, changing adapter. What it measures is the federation's own cost: transport, the
coordinator's checks, aggregation, metrics, checkpoints (bench/round_overhead.py, bench/scale.py).
"""

from __future__ import annotations

import logging
import time

import torch

from client.connection import ClientSetupError
from client.trainer import LocalResult
from common.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX, truncate_to_rank
from common.codec import DTYPES
from common.config import RunConfig
from common.methods import get_method
from common.synthetic import perturbed, synthetic_adapter, synthetic_partition_sizes
from common.validation import ExpectedTensors

log = logging.getLogger(__name__)

NOISE_SCALE = 1e-3
"""Standard deviation of the noise added to each trained factor: small next to A's entries (about 0.03 for
hidden size 1024), yet it moves B off zero and so the global adapter every round."""


class EchoTrainer:
    """LocalTrainer's interface (expected_task, train_round, base_residual_round), without a model."""

    def __init__(self, config: RunConfig, rank: int, partition: int, num_partitions: int) -> None:
        layout = config.model.synthetic_layout
        if layout is None:
            raise ClientSetupError("--bench-echo is benchmark-only: it needs a coordinator whose run config sets "
                                   "synthetic_layout (bench/round_overhead.py starts one); drop --bench-echo to "
                                   "train for real")
        self.config = config
        self.method = get_method(config.federation.method)
        self.wire_dtype = DTYPES[config.federation.wire_dtype]
        # The initial adapter at this client's rank: its shapes are what every task must have.
        self.adapter = truncate_to_rank(synthetic_adapter(layout, config.model.lora_rank, config.federation.seed),
                                        rank)
        self.num_examples = synthetic_partition_sizes(num_partitions)[partition]
        self.base_residual_round = 0

    def expected_task(self) -> ExpectedTensors:
        return self.method.expected_task(self.adapter)

    def train_round(self, round_index: int, global_tensors: dict[str, torch.Tensor], seed: int,
                    base_residual_round: int = 0) -> LocalResult:
        started = time.time()
        objective = self.method.local_objective(global_tensors, self.config, round_index)
        if self.method.base_residual_suffixes:       # nothing to fold it into; the state is what counts
            self.base_residual_round = base_residual_round
        start = {name: t.to(torch.float32) for name, t in objective.start.items()}
        trains = [name for name in start
                  if (name.endswith(LORA_A_SUFFIX) and objective.train_a)
                  or (name.endswith(LORA_B_SUFFIX) and objective.train_b)
                  or not name.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))]
        trained = {**start, **perturbed({name: start[name] for name in trains}, seed, NOISE_SCALE)}
        upload = self.method.upload(trained, round_index)
        upload = {name: tensor.to(self.wire_dtype) for name, tensor in upload.items()}
        return LocalResult(tensors=upload, num_examples=self.num_examples, train_loss=0.0,
                           train_seconds=time.time() - started, local_steps=0)
