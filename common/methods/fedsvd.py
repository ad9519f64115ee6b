"""FedSVD: clients train B only, A frozen at the global A_g (orthonormal rows); they upload B only.

Server step, per layer: M = s (sum p_i B_i) A_g(prev); clip; M/s = U S V^T; B_g = U S, A_g = V^T;
gain (common/aggregation.py ``frozen_a_target``, ``split_orthonormal_a``). An upload carries every
tensor but the lora_A factors; the coordinator fills them in from the global adapter the client
received (``Method.complete_upload``), which is exactly what the client held frozen.
"""

from __future__ import annotations

import torch

from common.adapter import LORA_A_SUFFIX
from common.aggregation import get_strategy
from common.methods.base import LocalObjective, Method
from common.validation import ExpectedTensors


def _without_a(tensors: dict) -> dict:
    return {name: value for name, value in tensors.items() if not name.endswith(LORA_A_SUFFIX)}


class FedSvd(Method):
    name = "fedsvd"
    label = "FedSVD"
    strategy = get_strategy("fedsvd")

    def expected_upload(self, adapter: dict[str, torch.Tensor], round_index: int) -> ExpectedTensors:
        return ExpectedTensors.like(_without_a(adapter))

    def local_objective(self, received: dict[str, torch.Tensor], config, round_index: int) -> LocalObjective:
        return LocalObjective(start=dict(received), train_a=False)

    def upload(self, trained: dict[str, torch.Tensor], round_index: int) -> dict[str, torch.Tensor]:
        return _without_a(trained)
