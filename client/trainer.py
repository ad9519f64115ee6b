"""Local training of one round: load the global adapter, train, return the new trainable tensors.

A pure function of (run configuration, client rows, global adapter, round seed)
on CPU: the seed fixes the shuffling and dropout, the optimizer starts fresh
every round (AdamW, weight decay 0, as in the reference study).

On a client of several ranks (torchrun, client/distributed.py) every rank runs this same loop: the
same shuffled order, global batches of per_device_train_batch_size x ranks rows of which each rank
takes its own slice, gradients averaged by DDP before clipping and the optimizer step, and
max_local_steps counting global batches. Up to float rounding (and dropout, drawn per rank) that is
one process training on the global batches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from client.distributed import SOLO, RankGroup
from client.memory import fix_mmap_threshold, release_free_memory
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
                 show_progress: bool | None = None, rank: int | None = None, group: RankGroup = SOLO) -> None:
        if not rows:
            raise ValueError("this client has no training rows; check its partition or --data file")
        self.group = group
        """The ranks this client trains with (SOLO: this process alone)."""
        self.config = config
        self.rows = rows
        self.device = device
        self.show_progress = show_progress
        self.method = get_method(config.federation.method)
        self.wire_dtype = DTYPES[config.federation.wire_dtype]
        self.rank = rank or config.model.lora_rank
        fix_mmap_threshold()            # before the model loads: freed activations go back (client/memory.py)
        self.built = build_model(client_model_config(config, self.rank), num_labels=num_labels,
                                 seed=config.federation.seed, device=device, task=config.data.task)
        self.lora = self.built.lora_parameters()
        release_free_memory()           # what loading the data and the model left free in the heap
        self.base_residual_round = 0
        """The last round whose base-weight residual (fedex_lora) is folded into this model's base weights."""

    def expected_task(self) -> ExpectedTensors:
        """What a task for this model must hold, as the method sends it (common/methods/)."""
        return self.method.expected_task(self.built.get_adapter_state())

    @property
    def global_batch_size(self) -> int:
        """Rows per micro-batch over all ranks: per_device_train_batch_size x ranks."""
        return self.config.train.per_device_train_batch_size * self.group.world_size

    def _micro_batches(self, generator: torch.Generator) -> Iterator[list[dict]]:
        """One or more shuffled epochs of global micro-batches, capped at max_local_steps of them."""
        train = self.config.train
        batch = self.global_batch_size
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
        per_epoch = -(-len(self.rows) // self.global_batch_size)
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
        optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)

        group = self.group
        torch.manual_seed(group.dropout_seed(seed))              # dropout: the round seed on rank 0
        generator = torch.Generator().manual_seed(seed)          # shuffling: the same order on every rank
        self.built.model.train()
        losses: list[float] = []
        shard_rows: list[int] = []                                # rows of each micro-batch this rank trained on
        batch_rows: list[int] = []                                # rows of each global micro-batch
        accumulation = train.gradient_accumulation_steps
        total = self._num_micro_batches()
        progress = tqdm(total=total, desc=f"round {round_index}", unit="batch", leave=False,
                        disable=None if self.show_progress is None else not self.show_progress)  # None: only on a terminal
        optimizer.zero_grad(set_to_none=True)
        # Built after requires_grad is set above: DDP registers the parameters that train this round.
        with group.data_parallel(self.built.model) as model:
            built = dataclasses.replace(self.built, model=model)      # forward passes through the wrapper
            for step, rows in enumerate(self._micro_batches(generator), start=1):
                mine, share = group.shard(rows)                        # share: 1.0 for a full batch (exact)
                stepping = step % accumulation == 0 or step == total
                batch = {k: v.to(self.device) for k, v in built.encode_batch(mine, self.config.data).items()}
                with group.gradient_sync(model, stepping):            # average the gradients at a step only
                    task_loss, _ = built.compute_loss(batch)
                    scaled = task_loss if share == 1.0 else task_loss * share
                    # The penalty is the same on every rank, so the ranks' average keeps it whole.
                    loss = scaled if objective.penalty is None else scaled + objective.penalty(self.lora)
                    (loss / accumulation).backward()
                if stepping:                                           # gradients are the ranks' average here
                    if train.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(float(task_loss.detach()))
                shard_rows.append(len(mine) if share else 0)
                batch_rows.append(len(rows))
                progress.update(1)
                progress.set_postfix(loss=f"{losses[-1]:.4f}")
        progress.close()
        del optimizer                   # its state (Adam moments) starts fresh every round: free it now
        losses = group.batch_losses(losses, shard_rows, batch_rows)     # the global batches' mean losses
        for A, B in self.lora.values():
            A.requires_grad_(True)
            B.requires_grad_(True)
        upload = self.method.upload(self.built.get_adapter_state(), round_index)
        upload = {name: tensor.to(self.wire_dtype) for name, tensor in upload.items()}   # the run's wire dtype
        release_free_memory()       # an idle client holds only what it uses until it is sampled again
        return LocalResult(tensors=upload, num_examples=len(self.rows),
                           train_loss=sum(losses) / max(1, len(losses)), train_seconds=time.time() - started,
                           local_steps=len(losses))
