"""Subspace-Reg: clients train A and B with a regularizer toward the global reference; the server
re-factorizes so that B_g's columns are an orthonormal basis U of the new update's top-r left
singular subspace, times a gain g.

Server step, per layer: as svd (M = sum p_i s B_i A_i; clip; M/s = U S V^T), then B_g = U, A_g = S V^T,
both times the gain (common/aggregation.py ``split_orthonormal_b``): so B_g = g U exactly.

The wire carries each fact once: once a reference exists, a task holds A_g, the other trainable
tensors, and per layer U (d, r) and the scalar g, not B_g beside them; the client forms B_g = g U, both
to start from and for the regularizer's alpha term (common/regularizer.py), as the study does. Before
the first server step there is no reference: the task is the initial adapter (B_g = 0).

Client objective: task loss + (1/P) sum_l [mu/2 ||s B A - s B_g A_g||^2 + alpha/2 ||B - B_g||^2
+ lambda/2 (||A||^2 + ||B||^2)] (common/regularizer.py ``SubspaceRegularizer``).
"""

from __future__ import annotations

import torch

from common.adapter import LORA_B_SUFFIX, REFERENCE_GAIN_SUFFIX, REFERENCE_SUFFIX, AdapterState, LoraFactors
from common.aggregation import get_strategy
from common.methods.base import LocalObjective, Method, Recipient, ServerStep
from common.regularizer import SubspaceRegularizer
from common.validation import ExpectedTensors


def _layers(adapter: dict[str, torch.Tensor]) -> list[str]:
    return [name[: -len(LORA_B_SUFFIX)] for name in adapter if name.endswith(LORA_B_SUFFIX)]


class SubspaceReg(Method):
    name = "subspace_reg"
    label = "Subspace-Reg"
    strategy = get_strategy("subspace_reg")

    def server_step(self, adapter, state, uploads, settings, round_index) -> ServerStep:
        """The aggregation, then B_g stored as exactly g U in float32 (the gain and the basis rounded to the wire
        first, then multiplied), so that the B_g a client forms from U and g is this one, bit for bit."""
        step = super().server_step(adapter, state, uploads, settings, round_index)
        kept = dict(step.state)
        lora = {}
        for layer, factors in step.adapter.lora.items():
            basis = step.state[layer + REFERENCE_SUFFIX].to(torch.float32)        # (d, r), orthonormal columns
            gain = torch.diagonal(basis.double().T @ factors.B.double()).mean()   # B_g = g U: g = diag(U^T B_g)
            basis = basis.to(settings.wire_dtype).to(torch.float32)
            gain = gain.to(torch.float32).reshape(()).to(settings.wire_dtype).to(torch.float32)
            kept[layer + REFERENCE_SUFFIX] = basis
            kept[layer + REFERENCE_GAIN_SUFFIX] = gain
            lora[layer] = LoraFactors(A=factors.A, B=(gain * basis).to(factors.B.dtype))
        return ServerStep(adapter=AdapterState(lora=lora, extra=step.adapter.extra), state=kept)

    def task_tensors(self, adapter: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     recipient: Recipient) -> dict[str, torch.Tensor]:
        layers = _layers(adapter)
        if not all(layer + REFERENCE_GAIN_SUFFIX in state for layer in layers):
            return dict(adapter)                                   # round 1: no reference yet
        task = {name: value for name, value in adapter.items() if not name.endswith(LORA_B_SUFFIX)}
        for layer in layers:
            task[layer + REFERENCE_SUFFIX] = state[layer + REFERENCE_SUFFIX]            # U (d, r)
            task[layer + REFERENCE_GAIN_SUFFIX] = state[layer + REFERENCE_GAIN_SUFFIX]  # g ()
        return task

    def expected_task(self, adapter: dict[str, torch.Tensor]) -> ExpectedTensors:
        required = {name: tuple(t.shape) for name, t in adapter.items() if not name.endswith(LORA_B_SUFFIX)}
        optional: dict[str, tuple[int, ...]] = {}
        for layer in _layers(adapter):
            shape = tuple(adapter[layer + LORA_B_SUFFIX].shape)
            optional[layer + LORA_B_SUFFIX] = shape                # round 1
            optional[layer + REFERENCE_SUFFIX] = shape             # later rounds: U and g
            optional[layer + REFERENCE_GAIN_SUFFIX] = ()
        return ExpectedTensors(required, optional)

    def local_objective(self, received: dict[str, torch.Tensor], config, round_index: int) -> LocalObjective:
        start = {name: value for name, value in received.items()
                 if not name.endswith((REFERENCE_SUFFIX, REFERENCE_GAIN_SUFFIX))}
        for name in [n for n in received if n.endswith(REFERENCE_SUFFIX)]:
            layer = name[: -len(REFERENCE_SUFFIX)]
            start[layer + LORA_B_SUFFIX] = received[layer + REFERENCE_GAIN_SUFFIX] * received[name]   # B_g = g U
        missing = [name for name in _expected_b(received) if name not in start]
        if missing:
            raise ValueError(f"subspace_reg task has neither lora_B nor the reference basis and gain for {missing[:3]}")
        reference = AdapterState.from_state_dict(start).lora          # A_g, B_g: constants of the penalty
        fed = config.federation
        # Prepared once for the round: the reference's stacks and Grams are not rebuilt at every step.
        penalty = SubspaceRegularizer(reference, config.model.scaling, fed.mu, fed.alpha, fed.lambda_reg)
        return LocalObjective(start=start, penalty=penalty)


def _expected_b(received: dict[str, torch.Tensor]) -> list[str]:
    """Every layer's lora_B name, from the layers whose lora_A arrived."""
    return [name.replace(".lora_A.weight", LORA_B_SUFFIX) for name in received if name.endswith(".lora_A.weight")]
