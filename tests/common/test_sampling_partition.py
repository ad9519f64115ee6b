"""Client sampling and dataset partitioning: deterministic, complete, JSON-safe."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.partition import Partition, dirichlet_partition, iid_partition, partition_stats
from common.sampling import sample_clients

# --------------------------------------------------------------------------- sampling


SCHEMES = ("independent", "seed_plus_round")


@settings(max_examples=40, deadline=None)
@given(num_clients=st.integers(1, 50), data=st.data(), seed=st.integers(0, 10**6), round_index=st.integers(0, 100),
       scheme=st.sampled_from(SCHEMES))
def test_sample_is_sorted_unique_and_deterministic(num_clients, data, seed, round_index, scheme) -> None:
    m = data.draw(st.integers(1, num_clients))
    chosen = sample_clients(num_clients, m, seed, round_index, scheme=scheme)
    assert chosen == sorted(set(chosen)) and len(chosen) == m
    assert all(0 <= i < num_clients for i in chosen)
    assert chosen == sample_clients(num_clients, m, seed, round_index, scheme=scheme)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sample_independent_of_call_order_and_global_rng(scheme) -> None:
    forward = [sample_clients(10, 3, 42, t, scheme=scheme) for t in range(20)]
    backward = [sample_clients(10, 3, 42, t, scheme=scheme) for t in reversed(range(20))][::-1]
    assert forward == backward
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sample_clients(10, 3, 42, 5, scheme=scheme)
    assert torch.equal(torch.rand(3), expected)  # the global generator is untouched


def test_seed_plus_round_is_the_reference_draw_bit_for_bit() -> None:
    # The study's scheme: a torch.Generator seeded with seed + round, the first m of randperm, sorted.
    for seed, t in [(42, 0), (42, 5), (43, 19), (0, 0), (7, 100)]:
        generator = torch.Generator(device="cpu").manual_seed(seed + t)
        reference = sorted(int(i) for i in torch.randperm(10, generator=generator)[:3])
        assert sample_clients(10, 3, seed, t, scheme="seed_plus_round") == reference
    # Same seed + round sum gives the same draw (the generator is seeded with seed + round).
    assert sample_clients(10, 3, 40, 7, scheme="seed_plus_round") == sample_clients(10, 3, 42, 5,
                                                                                    scheme="seed_plus_round")
    # Hence seed 43's schedule is seed 42's shifted by one round: what "independent" avoids.
    shifted = [sample_clients(10, 3, 42, t + 1, scheme="seed_plus_round") for t in range(20)]
    assert [sample_clients(10, 3, 43, t, scheme="seed_plus_round") for t in range(20)] == shifted


def test_seed_plus_round_rejects_an_int64_overflow() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        sample_clients(10, 3, 2**63 - 1, 1, scheme="seed_plus_round")


def test_independent_is_the_default_and_deterministic() -> None:
    first = [sample_clients(10, 3, 42, t) for t in range(20)]
    assert first == [sample_clients(10, 3, 42, t, scheme="independent") for t in range(20)]
    assert first == [sample_clients(10, 3, 42, t, scheme="independent") for t in range(20)]


def test_independent_seeds_are_not_shifted_copies() -> None:
    seed_42 = [sample_clients(10, 3, 42, t, scheme="independent") for t in range(21)]
    seed_43 = [sample_clients(10, 3, 43, t, scheme="independent") for t in range(20)]
    assert seed_43 != seed_42[1:]  # not seed 42's sequence shifted by one round
    assert seed_43 != seed_42[:20]  # nor the same sequence
    # Not even mostly: with 120 possible draws, two unrelated 20-round schedules agree on a few rounds at most.
    assert sum(a == b for a, b in zip(seed_43, seed_42[1:])) <= 5


def test_independent_accepts_seeds_beyond_int64() -> None:
    # SeedSequence hashes any non-negative int, so seed + round cannot overflow the generator's int64.
    chosen = sample_clients(10, 3, 2**63 - 1, 1, scheme="independent")
    assert chosen == sorted(set(chosen)) and len(chosen) == 3


def test_sample_varies_across_rounds_and_covers_clients() -> None:
    for scheme in SCHEMES:
        draws = [tuple(sample_clients(10, 3, 42, t, scheme=scheme)) for t in range(30)]
        assert len(set(draws)) > 10
        assert set().union(*draws) == set(range(10))


def test_unknown_scheme_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"scheme='seed\+1'.*independent, seed_plus_round"):
        sample_clients(10, 3, 42, 0, scheme="seed+1")


@pytest.mark.parametrize("args, field", [
    ((0, 1, 42, 0), "num_clients"),
    ((5, 0, 42, 0), "clients_per_round"),
    ((5, 6, 42, 0), "clients_per_round=6 exceeds num_clients=5"),
    ((5, 2, -1, 0), "seed"),
    ((5, 2, 42, -1), "round_index"),
    ((5, 2.0, 42, 0), "clients_per_round"),
])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sample_validation(args, field, scheme) -> None:
    with pytest.raises(ValueError, match=field):
        sample_clients(*args, scheme=scheme)


# --------------------------------------------------------------------------- partitioning


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.sampled_from(["a", "b", "c", "d", 7]), min_size=20, max_size=300),
    num_clients=st.integers(1, 10),
    alpha=st.floats(0.05, 10.0),
    min_size=st.integers(0, 10),
    seed=st.integers(0, 10**6),
)
def test_dirichlet_covers_every_index_once(labels, num_clients, alpha, min_size, seed) -> None:
    partition = dirichlet_partition(labels, num_clients, alpha, min_size, seed)
    flat = sorted(i for part in partition.indices for i in part)
    assert flat == list(range(len(labels)))
    assert len(partition.indices) == num_clients
    assert partition.scheme in ("dirichlet", "round_robin_fallback")
    if partition.scheme == "dirichlet":
        assert min(partition.sizes) >= min_size
    assert partition == dirichlet_partition(labels, num_clients, alpha, min_size, seed)


def test_dirichlet_is_non_iid_for_small_alpha() -> None:
    labels = [i % 5 for i in range(2000)]
    partition = dirichlet_partition(labels, 10, 0.3, 1, seed=42)
    assert partition.scheme == "dirichlet"
    stats = partition_stats(partition, labels)
    # With alpha = 0.3 most clients are dominated by a few labels.
    dominant = [max(h.values()) / sum(h.values()) for h in stats["histograms"]]
    assert sum(dominant) / len(dominant) > 0.4


def test_fallback_when_min_client_size_cannot_be_met() -> None:
    labels = ["x"] * 30 + ["y"] * 30
    partition = dirichlet_partition(labels, 6, 0.3, min_client_size=11, seed=1)  # 60 / 6 = 10 < 11: impossible
    assert partition.scheme == "round_robin_fallback"
    assert sorted(i for p in partition.indices for i in p) == list(range(60))
    assert partition.sizes == [10] * 6
    assert partition.indices == iid_partition(60, 6, seed=1).indices


def test_fallback_for_tiny_alpha() -> None:
    labels = [i % 3 for i in range(300)]
    partition = dirichlet_partition(labels, 10, 0.01, min_client_size=8, seed=3)
    assert partition.scheme == "round_robin_fallback"
    assert min(partition.sizes) >= 8


def test_iid_round_robin() -> None:
    partition = iid_partition(103, 10, seed=42)
    assert partition.scheme == "iid"
    assert sorted(partition.sizes) == [10] * 7 + [11] * 3
    assert sorted(i for p in partition.indices for i in p) == list(range(103))
    assert partition.indices != iid_partition(103, 10, seed=43).indices


def test_stats_are_json_serializable() -> None:
    import numpy as np

    labels = np.array([0, 1, 2, 1, 0, 2, 2, 1] * 10)
    partition = dirichlet_partition(list(labels), 4, 0.5, 1, seed=0)
    stats = partition_stats(partition, list(labels))
    text = json.dumps(stats, allow_nan=False)
    loaded = json.loads(text)
    assert loaded["scheme"] == partition.scheme and loaded["num_clients"] == 4
    assert loaded["sizes"] == partition.sizes and sum(loaded["sizes"]) == 80
    assert loaded["min_size"] == min(partition.sizes) and loaded["max_size"] == max(partition.sizes)
    assert loaded["mean_size"] == 20.0
    assert all(set(h) <= {"0", "1", "2"} for h in loaded["histograms"])
    assert sum(sum(h.values()) for h in loaded["histograms"]) == 80


@pytest.mark.parametrize("call, field", [
    (lambda: dirichlet_partition([1, 2, 3], 0, 0.3, 1, 0), "num_clients"),
    (lambda: dirichlet_partition([1, 2, 3], 2, 0.0, 1, 0), "alpha"),
    (lambda: dirichlet_partition([1, 2, 3], 2, 0.3, -1, 0), "min_client_size"),
    (lambda: dirichlet_partition([1, 2, 3], 2, 0.3, 1, -5), "seed"),
    (lambda: dirichlet_partition([1, 2], 3, 0.3, 1, 0), "num_clients=3"),
    (lambda: iid_partition(2, 3, 0), "num_clients=3"),
    (lambda: partition_stats(Partition([[0, 5]], "iid"), [1, 2]), "index 5"),
    (lambda: Partition([[0]], "random"), "scheme"),
])
def test_partition_validation(call, field) -> None:
    with pytest.raises(ValueError, match=field):
        call()
