"""The method contract: everything one federated method decides about a round, in one object.

A method owns, for one round (docs/DESIGN.md §4.0):

- what the coordinator sends a sampled client (``task_tensors``: the global adapter and any method
  state, such as the reference basis) and so what a client must expect (``expected_task``);
- what the client trains and the penalty it adds to the task loss (``local_objective``);
- what the client uploads (``upload``) and so what the coordinator expects (``expected_upload``);
- the server step (``server_step``: factored, exact, float64, common/aggregation.py);
- the method state the coordinator keeps between rounds and checkpoints (``state`` tensors).

server/coordinator.py and client/trainer.py call these and nothing else; they hold no method names
and no method flags. A new method is one subclass in one file, registered with
``common.methods.register``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from common.adapter import REFERENCE_SUFFIX, AdapterState, ClientUpdate
from common.aggregation import AggregationSettings, Strategy
from common.validation import ExpectedTensors

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Layer -> (A (r, k), B (d, r)): a client's live LoRA parameters."""


@dataclass(frozen=True)
class LocalObjective:
    """What a client does with one task: the adapter to start from, which factors train, and the penalty
    added to the task loss (a function of the live factors; None: the task loss alone)."""

    start: dict[str, torch.Tensor]
    train_a: bool = True
    train_b: bool = True
    penalty: Callable[[Factors], torch.Tensor] | None = None


@dataclass(frozen=True)
class ServerStep:
    """The new global adapter (the previous one's dtype) and the method state to keep and checkpoint."""

    adapter: AdapterState
    state: dict[str, torch.Tensor]


class Method:
    """Base of every method. The defaults describe the plain case (FedAvg-like): the client receives the
    global adapter, trains every tensor with the task loss alone and uploads all of it."""

    name: str = ""
    label: str = ""
    """How reports and plots name the method."""
    strategy: Strategy
    """The server step's math (common/aggregation.py)."""

    # ---------------------------------------------------------------- coordinator side

    def task_tensors(self, adapter: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a sampled client receives: here, the global adapter alone."""
        return dict(adapter)

    def expected_upload(self, adapter: dict[str, torch.Tensor]) -> ExpectedTensors:
        """What an upload must hold, given the global adapter: here, all of it."""
        return ExpectedTensors.like(adapter)

    def complete_upload(self, adapter: dict[str, torch.Tensor], upload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A validated upload as a whole adapter (what clipping and the server step read): a method whose
        clients upload part of it fills in the rest from the global adapter. Here: nothing to fill."""
        return upload

    def server_step(self, adapter: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                    uploads: Sequence[ClientUpdate], settings: AggregationSettings) -> ServerStep:
        """Aggregate validated uploads into the new global adapter; the state keeps each layer's orthonormal
        basis U of the new global update (every method has one; only some send it)."""
        result = self.strategy.aggregate(AdapterState.from_state_dict(adapter), uploads, settings)
        return ServerStep(adapter=result.state,
                          state={layer + REFERENCE_SUFFIX: basis for layer, basis in result.reference_basis.items()})

    # ---------------------------------------------------------------- client side

    def expected_task(self, adapter: dict[str, torch.Tensor]) -> ExpectedTensors:
        """What a task must hold, given this client's adapter: here, exactly the adapter's tensors."""
        return ExpectedTensors.like(adapter)

    def local_objective(self, received: dict[str, torch.Tensor], config) -> LocalObjective:
        """How to train on a received task: here, start from it and train everything on the task loss."""
        return LocalObjective(start=dict(received))

    def upload(self, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the client sends back: here, every trained tensor."""
        return trained
