"""FFA-LoRA (Sun et al., arXiv 2403.12313): A is frozen at a shared random initialisation, clients train B.

A_g is the initial A of the run: the coordinator draws it from the run seed (PEFT's Kaiming-uniform
initialisation, common/modeling.py ``build_model``) and every client receives it with each task, so all
clients hold the same A. Clients train B (and the head) and upload B only; the server step is
B_g = sum p_i B_i and A_g unchanged, bit for bit. The aggregation is exact: sum p_i s B_i A = s B_g A.
"""

from __future__ import annotations

import torch

from common.adapter import LORA_A_SUFFIX, AdapterState, LoraFactors
from common.aggregation import get_strategy
from common.methods.base import LocalObjective, Method, ServerStep
from common.validation import ExpectedTensors


def without_suffix(tensors: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    """Every tensor but those whose names end with ``suffix`` (a factor the client held frozen)."""
    return {name: value for name, value in tensors.items() if not name.endswith(suffix)}


def keep_factor(step: ServerStep, adapter: dict[str, torch.Tensor], factor: str) -> ServerStep:
    """The step with one factor ("A" or "B") of every layer replaced by the previous global one, bit for bit:
    averaging K copies of the same tensor in float64 is not always exactly that tensor again."""
    previous = AdapterState.from_state_dict(adapter).lora
    lora = {layer: LoraFactors(A=previous[layer].A if factor == "A" else new.A,
                               B=previous[layer].B if factor == "B" else new.B)
            for layer, new in step.adapter.lora.items()}
    return ServerStep(adapter=AdapterState(lora=lora, extra=step.adapter.extra), state=step.state,
                      base_increment=step.base_increment)


class FfaLora(Method):
    name = "ffa_lora"
    label = "FFA-LoRA"
    strategy = get_strategy("fedavg")

    def expected_upload(self, adapter: dict[str, torch.Tensor], round_index: int) -> ExpectedTensors:
        return ExpectedTensors.like(without_suffix(adapter, LORA_A_SUFFIX))

    def server_step(self, adapter, state, uploads, settings, round_index) -> ServerStep:
        """B_g = sum p_i B_i (and the head's mean); A_g is the shared initial A, unchanged."""
        return keep_factor(super().server_step(adapter, state, uploads, settings, round_index), adapter, "A")

    def local_objective(self, received: dict[str, torch.Tensor], config, round_index: int) -> LocalObjective:
        return LocalObjective(start=dict(received), train_a=False)

    def upload(self, trained: dict[str, torch.Tensor], round_index: int) -> dict[str, torch.Tensor]:
        return without_suffix(trained, LORA_A_SUFFIX)
