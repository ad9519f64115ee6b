"""Local training of one round: load the global adapter, train, return the new trainable tensors.

A pure function of (run configuration, client rows, global adapter, round seed)
on CPU: the seed fixes the shuffling and dropout, the optimizer starts fresh
every round (AdamW, weight decay 0, as in the reference study).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common.codec import DTYPES
from common.config import ModelConfig, RunConfig
from common.methods import get_method
from common.modeling import build_model
from common.validation import ExpectedTensors

def client_model_config(config: RunConfig, rank: int) -> ModelConfig:
    """The model configuration of a client training at LoRA rank ``rank`` (<= lora_rank): lora_alpha scaled with
    the rank, so that s = lora_alpha / r is the run's for every client and s B A means the same on all of them."""
    if rank == config.model.lora_rank:
        return config.model
    return dataclasses.replace(config.model, lora_rank=rank, lora_alpha=config.model.scaling * rank)


@dataclass(frozen=True)
class LocalResult:
    tensors: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    train_seconds: float
    local_steps: int


class LocalTrainer:
    def __init__(self, config: RunConfig, rows: list[dict], num_labels: int, device: str = "cpu",
                 show_progress: bool | None = None, rank: int | None = None) -> None:
        if not rows:
            raise ValueError("this client has no training rows; check its partition or --data file")
        self.config = config
        self.rows = rows
        self.device = device
        self.show_progress = show_progress
        self.method = get_method(config.federation.method)
        self.wire_dtype = DTYPES[config.federation.wire_dtype]
        self.rank = rank or config.model.lora_rank
        self.built = build_model(client_model_config(config, self.rank), num_labels=num_labels,
                                 seed=config.federation.seed, device=device, task=config.data.task)
        self.lora = self.built.lora_parameters()
        self.base_residual_round = 0
        """The last round whose base-weight residual (fedex_lora) is folded into this model's base weights."""

    def expected_task(self) -> ExpectedTensors:
        """What a task for this model must hold, as the method sends it (common/methods/)."""
        return self.method.expected_task(self.built.get_adapter_state())

    def _micro_batches(self, generator: torch.Generator) -> Iterator[list[dict]]:
        """One or more shuffled epochs, capped at max_local_steps micro-batches."""
        train = self.config.train
        batch = train.per_device_train_batch_size
        cap = train.max_local_steps
        produced = 0
        for _ in range(train.local_epochs):
            order = torch.randperm(len(self.rows), generator=generator).tolist()
            for start in range(0, len(order), batch):
                if cap is not None and produced >= cap:
                    return
                yield [self.rows[i] for i in order[start: start + batch]]
                produced += 1

    def _num_micro_batches(self) -> int:
        train = self.config.train
        per_epoch = -(-len(self.rows) // train.per_device_train_batch_size)
        total = per_epoch * train.local_epochs
        return total if train.max_local_steps is None else min(total, train.max_local_steps)

    def train_round(self, round_index: int, global_tensors: dict[str, torch.Tensor], seed: int,
                    base_residual_round: int = 0) -> LocalResult:
        """Train on one task; ``base_residual_round``: the round the task's base-weight residual (if the method
        sends one) brings this model's base weights to."""
        started = time.time()
        objective = self.method.local_objective(global_tensors, self.config, round_index)   # start, frozen, penalty
        if objective.base_delta:
            self.built.add_to_base_weights(objective.base_delta)
        if self.method.base_residual_suffixes:
            self.base_residual_round = base_residual_round
        self.built.set_adapter_state(objective.start)
        for A, B in self.lora.values():
            A.requires_grad_(objective.train_a)
            B.requires_grad_(objective.train_b)
        params = [p for p in self.built.model.parameters() if p.requires_grad]
        train = self.config.train
        optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=0.0)

        torch.manual_seed(seed)                                  # dropout
        generator = torch.Generator().manual_seed(seed)          # shuffling
        self.built.model.train()
        losses: list[float] = []
        accumulation = train.gradient_accumulation_steps
        total = self._num_micro_batches()
        progress = tqdm(total=total, desc=f"round {round_index}", unit="batch", leave=False,
                        disable=None if self.show_progress is None else not self.show_progress)  # None: only on a terminal
        optimizer.zero_grad(set_to_none=True)
        for step, rows in enumerate(self._micro_batches(generator), start=1):
            batch = {k: v.to(self.device) for k, v in self.built.encode_batch(rows, self.config.data).items()}
            task_loss, _ = self.built.compute_loss(batch)
            loss = task_loss if objective.penalty is None else task_loss + objective.penalty(self.lora)
            (loss / accumulation).backward()
            if step % accumulation == 0 or step == total:
                if train.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(task_loss.detach()))
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
        progress.close()
        for A, B in self.lora.values():
            A.requires_grad_(True)
            B.requires_grad_(True)
        upload = self.method.upload(self.built.get_adapter_state(), round_index)
        upload = {name: tensor.to(self.wire_dtype) for name, tensor in upload.items()}   # the run's wire dtype
        return LocalResult(tensors=upload, num_examples=len(self.rows),
                           train_loss=sum(losses) / max(1, len(losses)), train_seconds=time.time() - started,
                           local_steps=len(losses))
