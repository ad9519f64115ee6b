"""scripts/rank_layout.py: GPUs per client for a reference run, keeping the run's batches exact."""

from __future__ import annotations

import pytest

from common.config import RunConfig
from scripts.rank_layout import choose_layout, exact_overrides


def _train(**values):
    return RunConfig.from_flat(values).train


def test_roberta_large_reference_on_two_gpus_per_client_keeps_its_rows_per_step_and_round():
    train = RunConfig.load("configs/roberta_large_hellaswag.yaml").train      # batch 1, accumulation 8, 30 steps
    layout = choose_layout(train, gpus=20, clients=10)
    assert layout.ranks == 2
    # 2 ranks x batch 1 x 4 accumulated = the study's 8 rows per step; 2 x 15 = its 30 rows per round.
    assert layout.overrides == {"gradient_accumulation_steps": 4, "max_local_steps": 15}


def test_a_divisible_batch_is_split_over_the_ranks_first():
    assert exact_overrides(_train(per_device_train_batch_size=16), 4) == {"per_device_train_batch_size": 4}


def test_the_most_ranks_that_keep_the_batches_are_chosen():
    train = _train(per_device_train_batch_size=6, gradient_accumulation_steps=1, max_local_steps=10)
    assert choose_layout(train, gpus=16, clients=4).ranks == 3        # 4 GPUs each, but 6 divides by 3, not 4


@pytest.mark.parametrize("gpus, clients", [(8, 10), (1, 1), (0, 3)])
def test_fewer_than_two_gpus_per_client_keep_one_process_each(gpus, clients):
    layout = choose_layout(_train(per_device_train_batch_size=8), gpus=gpus, clients=clients)
    assert (layout.ranks, layout.overrides) == (1, {})


def test_batches_that_divide_by_no_rank_count_keep_one_process_and_say_why():
    train = _train(per_device_train_batch_size=1, gradient_accumulation_steps=1, max_local_steps=7)
    layout = choose_layout(train, gpus=4, clients=2)
    assert layout.ranks == 1 and "divide by none of 2..2" in layout.note


def test_an_explicit_count_is_honoured_and_says_when_it_changes_the_batches():
    train = _train(per_device_train_batch_size=1, gradient_accumulation_steps=1, max_local_steps=7)
    layout = choose_layout(train, gpus=4, clients=2, requested=2)
    assert (layout.ranks, layout.overrides) == (2, {}) and "2 times the rows" in layout.note
    with pytest.raises(ValueError, match="NPROC_PER_CLIENT=8 but only 4 GPU"):
        choose_layout(train, gpus=4, clients=2, requested=8)
