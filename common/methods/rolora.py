"""RoLoRA (Chen et al., arXiv 2502.01755): clients alternate between the two factors, round by round.

In odd rounds clients train B with A frozen, in even rounds A with B frozen (and the head every round);
they upload the factor they trained, and the server averages only that factor: odd rounds
B_g = sum p_i B_i, even rounds A_g = sum p_i A_i; the frozen factor stays bit for bit as it was. Each
step is exact, because every client's product shares the frozen factor: sum p_i s B_i A_g = s B_g A_g.

Why B first: LoRA starts from B = 0 (PEFT's initialisation), so in round 1 the gradient of the loss
with respect to A, s B^T dL/dW, is zero; a round of training A alone would leave the adapter where it
was. The paper alternates from the same zero-B start; we open with the factor that can move.
"""

from __future__ import annotations

import torch

from common.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX
from common.aggregation import get_strategy
from common.methods.base import LocalObjective, Method, ServerStep
from common.methods.ffa_lora import keep_factor, without_suffix
from common.validation import ExpectedTensors


def trains_b(round_index: int) -> bool:
    """Odd rounds (1, 3, ...) train B with A frozen; even rounds train A with B frozen."""
    return round_index % 2 == 1


def _frozen(round_index: int) -> tuple[str, str]:
    """The factor held frozen in ``round_index``: its letter and its name suffix."""
    return ("A", LORA_A_SUFFIX) if trains_b(round_index) else ("B", LORA_B_SUFFIX)


class RoLora(Method):
    name = "rolora"
    label = "RoLoRA"
    strategy = get_strategy("fedavg")

    def expected_upload(self, adapter: dict[str, torch.Tensor], round_index: int) -> ExpectedTensors:
        return ExpectedTensors.like(without_suffix(adapter, _frozen(round_index)[1]))

    def server_step(self, adapter, state, uploads, settings, round_index) -> ServerStep:
        """The mean of the factor trained this round (and of the head); the frozen factor unchanged."""
        step = super().server_step(adapter, state, uploads, settings, round_index)
        return keep_factor(step, adapter, _frozen(round_index)[0])

    def local_objective(self, received: dict[str, torch.Tensor], config, round_index: int) -> LocalObjective:
        b_round = trains_b(round_index)
        return LocalObjective(start=dict(received), train_a=not b_round, train_b=b_round)

    def upload(self, trained: dict[str, torch.Tensor], round_index: int) -> dict[str, torch.Tensor]:
        return without_suffix(trained, _frozen(round_index)[1])
