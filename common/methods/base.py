"""The method contract: everything one federated method decides about a round, in one object.

A method owns, for one round (docs/DESIGN.md §4.0):

- what the coordinator sends a sampled client (``task_tensors``: the global adapter and any method
  state, such as the reference basis, or the base-weight residual the client has not folded in yet) and
  so what a client must expect (``expected_task``);
- what the client trains and the penalty it adds to the task loss (``local_objective``);
- what the client uploads (``upload``) and so what the coordinator expects (``expected_upload``);
- the server step (``server_step``: factored, exact, float64, common/aggregation.py; its result rounded
  to what the wire carries);
- the method state the coordinator keeps between rounds and checkpoints (``state`` tensors), and any
  residual it folds into the frozen base weights (``ServerStep.base_increment``, ``base_increments``).

Heterogeneous client ranks and the wire dtype are not a method's concern: the coordinator truncates a
task to the recipient's rank (common/adapter.py ``truncate_to_rank``) and zero-pads its upload back
(``pad_to_rank``), which leaves every product B A, and so every method's weighted sums, unchanged.

server/coordinator.py and client/trainer.py call these and nothing else; they hold no method names
and no method flags. A new method is one subclass in one file, registered with
``common.methods.register``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from common.adapter import REFERENCE_SUFFIX, AdapterState, ClientUpdate, round_to_wire
from common.aggregation import AggregationSettings, Strategy
from common.validation import ExpectedTensors

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Layer -> (A (r, k), B (d, r)): a client's live LoRA parameters."""

BaseDelta = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
"""What to add to one layer's frozen base weight W (d, k): a dense (d, k) tensor, or factors (B (d, m),
A (m, k)) whose product is added."""


@dataclass(frozen=True)
class Recipient:
    """Whom a task is for, as the coordinator knows the sampled client."""

    round: int
    """The round the task is for (1-based)."""
    rank: int
    """The LoRA rank the client trains at (<= the global rank; the coordinator truncates the task to it)."""
    base_residual_round: int = 0
    """The last round whose base-weight residual the client has folded into its base weights (fedex_lora)."""


@dataclass(frozen=True)
class LocalObjective:
    """What a client does with one task: the adapter to start from, which factors train, and the penalty
    added to the task loss (a function of the live factors; None: the task loss alone)."""

    start: dict[str, torch.Tensor]
    train_a: bool = True
    train_b: bool = True
    penalty: Callable[[Factors], torch.Tensor] | None = None
    base_delta: dict[str, BaseDelta] = field(default_factory=dict)
    """Layer -> BaseDelta to add to the frozen base weights before training (fedex_lora's residual)."""


@dataclass(frozen=True)
class ServerStep:
    """The new global adapter (the previous one's dtype), the method state to keep and checkpoint, and the
    round's increment of the frozen base weights, if the method has one (layer -> (B (d, m), A (m, k)))."""

    adapter: AdapterState
    state: dict[str, torch.Tensor]
    base_increment: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Method:
    """Base of every method. The defaults describe the plain case (FedAvg-like): the client receives the
    global adapter, trains every tensor with the task loss alone and uploads all of it."""

    name: str = ""
    label: str = ""
    """How reports and plots name the method."""
    strategy: Strategy
    """The server step's math (common/aggregation.py)."""

    # ---------------------------------------------------------------- coordinator side

    base_residual_suffixes: tuple[str, ...] = ()
    """Name suffixes of the task tensors that carry a base-weight residual (fedex_lora): they travel in float32
    whatever the wire dtype, are never truncated to a client's rank, and their bytes are reported in
    metrics.jsonl as residual_bytes_down."""

    def task_tensors(self, adapter: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     recipient: Recipient) -> dict[str, torch.Tensor]:
        """What a sampled client receives (before the coordinator truncates it to the client's rank): here,
        the global adapter alone."""
        return dict(adapter)

    def expected_upload(self, adapter: dict[str, torch.Tensor], round_index: int) -> ExpectedTensors:
        """What an upload for ``round_index`` must hold, given the global adapter as the client holds it (at
        its rank): here, all of it."""
        return ExpectedTensors.like(adapter)

    def complete_upload(self, adapter: dict[str, torch.Tensor], upload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A validated upload as a whole adapter (what clipping and the server step read): every tensor the
        client did not upload, because it held it frozen, is the global one it received."""
        return {**{name: value for name, value in adapter.items() if name not in upload}, **upload}

    def server_step(self, adapter: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                    uploads: Sequence[ClientUpdate], settings: AggregationSettings, round_index: int) -> ServerStep:
        """Aggregate validated uploads into the new global adapter, as the clients will hold it after the wire
        (rounded to ``settings.wire_dtype``: the coordinator evaluates and checkpoints the model its clients
        start from); the state keeps each layer's orthonormal basis U of the new global update (every method
        has one; only some send it)."""
        result = self.strategy.aggregate(AdapterState.from_state_dict(adapter), uploads, settings)
        rounded = AdapterState.from_state_dict(round_to_wire(result.state.to_state_dict(), settings.wire_dtype))
        return ServerStep(adapter=rounded,
                          state={layer + REFERENCE_SUFFIX: basis for layer, basis in result.reference_basis.items()})

    def base_increments(self, state: dict[str, torch.Tensor]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Every base-weight increment the kept state holds, oldest first (a resumed coordinator re-applies them
        to its evaluation model). Here: none."""
        return []

    # ---------------------------------------------------------------- client side

    def expected_task(self, adapter: dict[str, torch.Tensor]) -> ExpectedTensors:
        """What a task must hold, given this client's adapter (at its rank): here, exactly its tensors."""
        return ExpectedTensors.like(adapter)

    def local_objective(self, received: dict[str, torch.Tensor], config, round_index: int) -> LocalObjective:
        """How to train on a received task: here, start from it and train everything on the task loss."""
        return LocalObjective(start=dict(received))

    def upload(self, trained: dict[str, torch.Tensor], round_index: int) -> dict[str, torch.Tensor]:
        """What the client sends back: here, every trained tensor."""
        return trained
