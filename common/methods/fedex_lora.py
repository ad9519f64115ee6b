"""FedEx-LoRA (Singhal et al., arXiv 2410.09432): exact aggregation by folding the residual into the base weights.

Server step, per layer: A_g = sum p_i A_i and B_g = sum p_i B_i (as fedavg), and the residual

    R_t = s sum_i p_i B_i A_i - s B_g A_g

which is what averaging the factors loses. R_t is kept as factors, never as a (d, k) product:
B_R = [s p_1 B_1 .. s p_K B_K, -s B_g] (d, (K+1) r) and A_R = [A_1; ..; A_K; A_g] ((K+1) r, k), with
R_t = B_R A_R. Every model of the federation (each client's, and the coordinator's evaluation model)
adds R_t to its frozen base weight W of that layer, so that after round t

    W_0 + sum_{u <= t} R_u + s B_g A_g = the p-weighted mean of the round's client models,

exactly (to the rounding of the arithmetic). A client must fold in every round's residual, including
rounds in which it was not sampled. The coordinator keeps the log of increments (R_1, R_2, ...) as
method state, so it is checkpointed and survives a resume; a client says in each task request up to
which round it has folded the residual in (``Recipient.base_residual_round``), and its task carries the
increments it lacks, concatenated per layer (B (d, m), A (m, k)), or their sum as one dense (d, k) tensor
when that is smaller (m (d + k) >= d k): a client that joins late or restarts catches up either way.
Residual tensors travel in float32 whatever the wire dtype (every model must add the same residual),
are never truncated to a client's rank, and their bytes are reported as residual_bytes_down.

The log grows by (K + 1) r (d + k) floats per layer per round; the coordinator holds all of it.
"""

from __future__ import annotations

import torch

from common.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX
from common.aggregation import COMPUTE_DTYPE, client_weights, get_strategy
from common.methods.base import BaseDelta, LocalObjective, Method, Recipient, ServerStep
from common.validation import AtMost, ExpectedTensors

RESIDUAL_B_SUFFIX = ".base_residual_B"
"""``<layer>.base_residual_B`` (d, m): left factor of the residual increments a task carries."""
RESIDUAL_A_SUFFIX = ".base_residual_A"
"""``<layer>.base_residual_A`` (m, k): right factor (B_R A_R is added to the base weight)."""
RESIDUAL_DENSE_SUFFIX = ".base_residual"
"""``<layer>.base_residual`` (d, k): the increments' sum, sent instead of factors when it is smaller."""
LOG_PREFIX = "base_residual_log/"
"""Method-state keys of the log: ``base_residual_log/<round:06d>/<layer>/B`` and ``.../A``."""


def _log_key(round_index: int, layer: str, factor: str) -> str:
    return f"{LOG_PREFIX}{round_index:06d}/{layer}/{factor}"


def read_log(state: dict[str, torch.Tensor]) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Round -> layer -> (B_R (d, m), A_R (m, k)), rounds ascending."""
    log: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in sorted(k for k in state if k.startswith(LOG_PREFIX) and k.endswith("/B")):
        round_text, layer = key[len(LOG_PREFIX):-2].split("/", 1)
        log.setdefault(int(round_text), {})[layer] = (state[key], state[_log_key(int(round_text), layer, "A")])
    return dict(sorted(log.items()))


def base_residual_through(state: dict[str, torch.Tensor], round_index: int) -> dict[str, torch.Tensor]:
    """Layer -> the dense residual (d, k) folded into its base weight after round ``round_index``: the sum of
    the logged increments of rounds 1..round_index, in float64. The log only grows, so the last checkpoint of
    a run holds every round's: the model evaluated after round t is the pretrained base plus this, plus
    adapters/round_t (or adapters/best, whose round.txt names t), e.g.
    ``built.add_to_base_weights(base_residual_through(RunDirectory(run).load_checkpoint()[1], t))``."""
    log = read_log(state)
    if round_index > 0 and round_index not in log:
        raise ValueError(f"the residual log ends at round {max(log, default=0)}; round {round_index} was not "
                         f"committed in this run (or the state is not fedex_lora's)")
    merged: dict[str, torch.Tensor] = {}
    for logged_round, increments in log.items():
        if logged_round > round_index:
            break
        for layer, (b_res, a_res) in increments.items():
            product = b_res.to(COMPUTE_DTYPE) @ a_res.to(COMPUTE_DTYPE)          # (d, k)
            merged[layer] = product if layer not in merged else merged[layer] + product
    return merged


def _residual_factors(uploads, weights: torch.Tensor, layer: str, global_b: torch.Tensor, global_a: torch.Tensor,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """B_R = [s p_i B_i .., -s B_g] (d, (K+1) r), A_R = [A_i; ..; A_g] ((K+1) r, k), in float64."""
    b_blocks = [scaling * w * u.state.lora[layer].B.to(COMPUTE_DTYPE) for w, u in zip(weights.tolist(), uploads)]
    a_blocks = [u.state.lora[layer].A.to(COMPUTE_DTYPE) for u in uploads]
    b_blocks.append(-scaling * global_b.to(COMPUTE_DTYPE))
    a_blocks.append(global_a.to(COMPUTE_DTYPE))
    return torch.cat(b_blocks, dim=1), torch.cat(a_blocks, dim=0)


def _dense_is_smaller(rows: int, cols: int, rank: int) -> bool:
    return rank * (rows + cols) >= rows * cols


class FedExLora(Method):
    name = "fedex_lora"
    label = "FedEx-LoRA"
    strategy = get_strategy("fedavg")
    base_residual_suffixes = (RESIDUAL_B_SUFFIX, RESIDUAL_A_SUFFIX, RESIDUAL_DENSE_SUFFIX)

    # ---------------------------------------------------------------- coordinator side

    def server_step(self, adapter, state, uploads, settings, round_index) -> ServerStep:
        """Factor means (fedavg, rounded to the wire), and the round's residual R_t as factors, made with the
        rounded A_g, B_g that the clients receive, logged in the state."""
        step = super().server_step(adapter, state, uploads, settings, round_index)
        weights = client_weights(uploads)   # (K,) p_i
        dtype = next(iter(step.adapter.lora.values())).B.dtype
        increment = {}
        for layer, new in step.adapter.lora.items():
            b_res, a_res = _residual_factors(uploads, weights, layer, new.B, new.A, settings.scaling)
            increment[layer] = (b_res.to(dtype), a_res.to(dtype))
        return self._with_increment(step, state, round_index, increment)

    @staticmethod
    def _with_increment(step: ServerStep, state, round_index: int, increment) -> ServerStep:
        kept = {k: v for k, v in state.items() if k.startswith(LOG_PREFIX)}        # earlier rounds' increments
        for layer, (b_res, a_res) in increment.items():
            kept[_log_key(round_index, layer, "B")] = b_res
            kept[_log_key(round_index, layer, "A")] = a_res
        return ServerStep(adapter=step.adapter, state={**step.state, **kept}, base_increment=increment)

    def base_increments(self, state: dict[str, torch.Tensor]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        return list(read_log(state).values())

    def task_tensors(self, adapter: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     recipient: Recipient) -> dict[str, torch.Tensor]:
        """The global adapter and, per layer, the increments of the rounds after the client's
        base_residual_round: concatenated factors, or their sum when a dense (d, k) tensor is smaller."""
        task = dict(adapter)
        pending = [increments for round_index, increments in read_log(state).items()
                   if round_index > recipient.base_residual_round]
        if not pending:
            return task
        for layer in pending[0]:
            b_res = torch.cat([increments[layer][0] for increments in pending], dim=1)   # (d, m)
            a_res = torch.cat([increments[layer][1] for increments in pending], dim=0)   # (m, k)
            if _dense_is_smaller(b_res.shape[0], a_res.shape[1], b_res.shape[1]):
                task[layer + RESIDUAL_DENSE_SUFFIX] = (b_res.to(COMPUTE_DTYPE) @ a_res.to(COMPUTE_DTYPE)).to(b_res.dtype)
            else:
                task[layer + RESIDUAL_B_SUFFIX] = b_res.contiguous()
                task[layer + RESIDUAL_A_SUFFIX] = a_res.contiguous()
        return task

    # ---------------------------------------------------------------- client side

    def expected_task(self, adapter: dict[str, torch.Tensor]) -> ExpectedTensors:
        """The adapter, and per layer optionally the residual as factors (their inner size below the point
        where the dense form is smaller) or as one dense tensor."""
        expected = super().expected_task(adapter)
        optional = dict(expected.optional)
        for name, b in adapter.items():
            if not name.endswith(LORA_B_SUFFIX):
                continue
            layer = name[: -len(LORA_B_SUFFIX)]
            rows, cols = b.shape[0], adapter[layer + LORA_A_SUFFIX].shape[1]
            inner = AtMost(rows * cols // (rows + cols))
            optional[layer + RESIDUAL_B_SUFFIX] = (rows, inner)
            optional[layer + RESIDUAL_A_SUFFIX] = (inner, cols)
            optional[layer + RESIDUAL_DENSE_SUFFIX] = (rows, cols)
        return ExpectedTensors(expected.required, optional)

    def local_objective(self, received: dict[str, torch.Tensor], config, round_index: int) -> LocalObjective:
        start = {name: value for name, value in received.items() if not name.endswith(self.base_residual_suffixes)}
        return LocalObjective(start=start, base_delta=residual_deltas(received))


def residual_deltas(received: dict[str, torch.Tensor]) -> dict[str, BaseDelta]:
    """Layer -> the residual a task carries for it: dense (d, k), or factors (B (d, m), A (m, k))."""
    deltas: dict[str, BaseDelta] = {}
    for name, value in received.items():
        if name.endswith(RESIDUAL_DENSE_SUFFIX):
            deltas[name[: -len(RESIDUAL_DENSE_SUFFIX)]] = value
        elif name.endswith(RESIDUAL_B_SUFFIX):
            layer = name[: -len(RESIDUAL_B_SUFFIX)]
            a_res = received.get(layer + RESIDUAL_A_SUFFIX)
            if a_res is None or a_res.shape[0] != value.shape[1]:
                raise ValueError(f"fedex_lora task: residual factors of {layer!r} do not pair up "
                                 f"(B {tuple(value.shape)}, A {None if a_res is None else tuple(a_res.shape)})")
            deltas[layer] = (value, a_res)
    lonely = [n for n in received if n.endswith(RESIDUAL_A_SUFFIX) and n[: -len(RESIDUAL_A_SUFFIX)] not in deltas]
    if lonely:
        raise ValueError(f"fedex_lora task: residual A factors without their B: {lonely[:3]}")
    return deltas


