"""How many GPUs (torchrun ranks) each client of a reference run gets, keeping the run's batches exact.

A client of n ranks trains on global batches of per_device_train_batch_size x n rows. To stay the
study's configuration it must take the same optimizer steps over the same rows, so the training
settings are rescaled, when they divide, in one of two ways:

- per_device_train_batch_size / n: the global batch is the study's batch; nothing else changes;
- otherwise gradient_accumulation_steps / n and max_local_steps / n: each global batch holds n of the
  study's batches (the same rows, in the same order), so a step still sees b x a rows and a round b x s.

Used by scripts/gpu_reference.sh.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import TrainConfig


@dataclass(frozen=True)
class RankLayout:
    ranks: int
    """Processes (GPUs) per client; 1: a plain client process."""
    overrides: dict[str, int]
    """Config overrides that keep the run's batches with that many ranks."""
    note: str
    """Why this layout, for the operator."""


def exact_overrides(train: TrainConfig, ranks: int) -> dict[str, int] | None:
    """The training settings that make ``ranks`` ranks take the run's steps over the run's rows, or None."""
    batch, accumulation, steps = (train.per_device_train_batch_size, train.gradient_accumulation_steps,
                                  train.max_local_steps)
    if batch % ranks == 0:
        return {"per_device_train_batch_size": batch // ranks}
    if accumulation % ranks == 0 and steps is not None and steps % ranks == 0:
        return {"gradient_accumulation_steps": accumulation // ranks, "max_local_steps": steps // ranks}
    return None


def choose_layout(train: TrainConfig, gpus: int, clients: int, requested: int | None = None) -> RankLayout:
    """``requested`` ranks per client (None: as many as the GPUs allow, when there are at least 2 per client,
    that keep the batches exact)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"NPROC_PER_CLIENT={requested}: give a positive number of ranks per client")
        if requested > max(gpus, 1):
            raise ValueError(f"NPROC_PER_CLIENT={requested} but only {gpus} GPU(s) are in use: give at most {gpus}")
        if requested == 1:
            return RankLayout(1, {}, "one process per client (NPROC_PER_CLIENT=1)")
        overrides = exact_overrides(train, requested)
        if overrides is None:
            return RankLayout(requested, {}, f"{requested} ranks per client as asked; the run's batches do not "
                                             f"divide by {requested}, so each step sees {requested} times the rows")
        return RankLayout(requested, overrides, f"{requested} ranks per client as asked, batches kept exact")
    most = gpus // clients
    for ranks in range(most, 1, -1):
        overrides = exact_overrides(train, ranks)
        if overrides is not None:
            return RankLayout(ranks, overrides, f"{gpus} GPUs for {clients} clients: {ranks} ranks per client, "
                                                f"batches kept exact")
    why = (f"{gpus} GPU(s) for {clients} clients" if most < 2 else
           f"the run's batches divide by none of 2..{most} ranks")
    return RankLayout(1, {}, f"one process per client ({why})")
