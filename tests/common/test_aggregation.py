"""Server steps: factored == dense, the structure each method promises, and the edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.adapter import AdapterState, ClientUpdate, LoraFactors
from common.aggregation import (
    STRATEGIES,
    AggregationResult,
    AggregationSettings,
    Strategy,
    aggregate,
    get_strategy,
)
from tests.common.dense_reference import dense_layer_step, dense_server_step, dense_target, weights_of
from tests.common.factories import (
    DEFAULT_SHAPES,
    F64,
    HEAD_SHAPES,
    align_signs,
    make_generator,
    random_state,
    random_updates,
    rel_err,
)

METHODS = ("fedavg", "svd", "fedsvd", "subspace_reg")
REFACTORIZING = ("svd", "fedsvd", "subspace_reg")
TOL = 1e-6
SCALING = 2.0
PROPERTY = settings(max_examples=30, deadline=None)


@st.composite
def scenarios(draw: st.DrawFn, methods: tuple[str, ...] = METHODS) -> dict:
    """Random shapes (d != k allowed), K clients, client rank, target rank, clip mode and seed."""
    method = draw(st.sampled_from(methods))
    client_rank = draw(st.sampled_from([1, 2, 4, 8]))
    rank = client_rank if method == "fedavg" else draw(st.sampled_from([1, 2, 4, 8]))
    low = max(rank, client_rank)
    shapes = {
        "layer.a": (draw(st.integers(low, low + 12)), draw(st.integers(low, low + 12))),
        "layer.b": (draw(st.integers(low, low + 12)), draw(st.integers(low, low + 12))),
    }
    return {
        "method": method,
        "num_clients": draw(st.sampled_from([1, 2, 3, 5])),
        "client_rank": client_rank,
        "rank": rank,
        "shapes": shapes,
        "clip": draw(st.sampled_from(["none", "active", "loose"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def build(scenario: dict) -> tuple[AdapterState, list[ClientUpdate], AggregationSettings]:
    gen = make_generator(scenario["seed"])
    shapes, client_rank = scenario["shapes"], scenario["client_rank"]
    global_state = random_state(gen, shapes, client_rank, head=HEAD_SHAPES)
    updates = random_updates(gen, shapes, client_rank, scenario["num_clients"], head=HEAD_SHAPES)
    norms = [float(torch.linalg.matrix_norm(dense_target(scenario["method"], layer, global_state, updates, SCALING)))
             for layer in shapes]
    clip = {"none": None, "active": 0.5 * min(norms), "loose": 10.0 * max(norms)}[scenario["clip"]]
    return global_state, updates, AggregationSettings(scaling=SCALING, rank=scenario["rank"], max_update_norm=clip)


def product(factors: LoraFactors, scaling: float = SCALING) -> torch.Tensor:
    return scaling * factors.B.to(F64) @ factors.A.to(F64)


def numerical_rank(s: torch.Tensor) -> int:
    return int((s > s[0] * 1e-9).sum()) if s.numel() and s[0] > 0 else 0


# --------------------------------------------------------------------------- factored == dense


@PROPERTY
@given(scenarios())
def test_factored_matches_dense(scenario: dict) -> None:
    global_state, updates, config = build(scenario)
    result = aggregate(scenario["method"], global_state, updates, config)
    dense_layers, dense_extra = dense_server_step(scenario["method"], global_state, updates, config.scaling,
                                                  config.rank, config.max_update_norm)
    for layer, dense in dense_layers.items():
        new = result.state.lora[layer]
        assert new.B.shape == (global_state.lora[layer].B.shape[0], config.rank)
        assert new.A.shape == (config.rank, global_state.lora[layer].A.shape[1])
        assert rel_err(product(new), dense.product) <= TOL
        # Factors agree column by column, up to the SVD's sign, wherever the singular
        # direction is determined (non-zero singular value); fedavg has no sign freedom.
        if scenario["method"] == "fedavg":
            assert rel_err(new.B, dense.B) <= TOL and rel_err(new.A, dense.A) <= TOL
            continue
        determined = numerical_rank(dense.S)
        u = result.reference_basis[layer][:, :determined]
        signs = align_signs(u, dense.U[:, :determined])
        assert rel_err(u * signs, dense.U[:, :determined]) <= TOL
        assert rel_err(new.B[:, :determined] * signs, dense.B[:, :determined]) <= TOL
        assert rel_err(new.A[:determined] * signs[:, None], dense.A[:determined]) <= TOL
    for key, mean in dense_extra.items():
        assert rel_err(result.state.extra[key], mean) <= TOL


@PROPERTY
@given(scenarios(REFACTORIZING))
def test_product_is_rescaled_truncated_svd_of_clipped_target(scenario: dict) -> None:
    global_state, updates, config = build(scenario)
    result = aggregate(scenario["method"], global_state, updates, config)
    for layer in global_state.lora:
        m = dense_target(scenario["method"], layer, global_state, updates, SCALING)
        norm = float(torch.linalg.matrix_norm(m))
        if config.max_update_norm is not None and norm > config.max_update_norm:
            m = m * (config.max_update_norm / norm)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        truncated = u[:, :config.rank] @ torch.diag(s[:config.rank]) @ vh[:config.rank]
        gain_sq = float(torch.linalg.matrix_norm(m) / torch.linalg.matrix_norm(truncated))
        assert rel_err(product(result.state.lora[layer]), gain_sq * truncated) <= TOL
        # The gain restores the clipped target's norm.
        assert math.isclose(float(torch.linalg.matrix_norm(product(result.state.lora[layer]))),
                            float(torch.linalg.matrix_norm(m)), rel_tol=TOL)


@PROPERTY
@given(scenarios(("subspace_reg",)))
def test_subspace_reg_b_is_orthogonal_basis_of_top_subspace(scenario: dict) -> None:
    global_state, updates, config = build(scenario)
    result = aggregate("subspace_reg", global_state, updates, config)
    for layer, factors in result.state.lora.items():
        b = factors.B.to(F64)  # (d, r)
        gram = b.T @ b
        gain_sq = float(gram[0, 0])
        # Mutually orthogonal columns of equal norm g: B^T B = g^2 I.
        assert rel_err(gram, gain_sq * torch.eye(config.rank, dtype=F64)) <= TOL
        u = result.reference_basis[layer]
        assert rel_err(u.T @ u, torch.eye(config.rank, dtype=F64)) <= TOL
        assert rel_err(b, math.sqrt(gain_sq) * u) <= TOL
        # span(B) holds the top-r left singular subspace of the clipped weighted sum
        # (all of it when r <= rank M; the whole range of M otherwise).
        m = dense_target("subspace_reg", layer, global_state, updates, SCALING)
        u_m, s_m, _ = torch.linalg.svd(m, full_matrices=False)
        top = u_m[:, :min(config.rank, numerical_rank(s_m))]
        captured = float(torch.linalg.matrix_norm(u.T @ top) ** 2)
        assert math.isclose(captured, top.shape[1], rel_tol=TOL)


@PROPERTY
@given(scenarios(("fedsvd",)))
def test_fedsvd_a_has_orthogonal_rows_of_equal_norm(scenario: dict) -> None:
    global_state, updates, config = build(scenario)
    result = aggregate("fedsvd", global_state, updates, config)
    for factors in result.state.lora.values():
        a = factors.A.to(F64)  # (r, k)
        gram = a @ a.T
        assert rel_err(gram, float(gram[0, 0]) * torch.eye(config.rank, dtype=F64)) <= TOL


@PROPERTY
@given(st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**31 - 1))
def test_fedavg_of_identical_clients_returns_that_client(num_clients: int, rank: int, seed: int) -> None:
    gen = make_generator(seed)
    client = random_state(gen, DEFAULT_SHAPES, rank, head=HEAD_SHAPES)
    global_state = random_state(gen, DEFAULT_SHAPES, rank, head=HEAD_SHAPES)
    updates = [ClientUpdate(client=f"c{i}", num_examples=i + 3, state=client) for i in range(num_clients)]
    result = aggregate("fedavg", global_state, updates, AggregationSettings(SCALING, rank, 1.0))
    for layer, factors in client.lora.items():
        assert torch.allclose(result.state.lora[layer].A, factors.A, rtol=1e-12, atol=1e-14)
        assert torch.allclose(result.state.lora[layer].B, factors.B, rtol=1e-12, atol=1e-14)
    for key, tensor in client.extra.items():
        assert torch.allclose(result.state.extra[key], tensor, rtol=1e-12, atol=1e-14)


def test_reference_basis_of_fedavg_spans_new_product() -> None:
    gen = make_generator(3)
    global_state = random_state(gen, DEFAULT_SHAPES, 4)
    updates = random_updates(gen, DEFAULT_SHAPES, 4, 3)
    result = aggregate("fedavg", global_state, updates, AggregationSettings(SCALING, 4, None))
    for layer, factors in result.state.lora.items():
        u = result.reference_basis[layer]
        assert rel_err(u.T @ u, torch.eye(4, dtype=F64)) <= TOL
        p = product(factors)
        assert rel_err(u @ (u.T @ p), p) <= TOL  # projecting onto U keeps the new product


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("method", METHODS)
def test_all_b_zero_gives_finite_unrescaled_result(method: str) -> None:
    gen = make_generator(0)
    global_state = random_state(gen, DEFAULT_SHAPES, 4, head=HEAD_SHAPES, zero_b=True)
    updates = random_updates(gen, DEFAULT_SHAPES, 4, 3, head=HEAD_SHAPES, zero_b=True)
    result = aggregate(method, global_state, updates, AggregationSettings(SCALING, 4, 5.0))
    for layer, factors in result.state.lora.items():
        for tensor in (factors.A, factors.B, result.reference_basis[layer]):
            assert bool(torch.isfinite(tensor).all())
        assert float(torch.linalg.matrix_norm(product(factors))) == 0.0
        u = result.reference_basis[layer]
        assert rel_err(u.T @ u, torch.eye(4, dtype=F64)) <= TOL
        if method == "subspace_reg":  # B_g = U, not rescaled (g = 1)
            assert torch.allclose(factors.B, u)
        if method == "fedsvd":  # A_g = V^T, orthonormal rows, not rescaled
            assert torch.allclose(factors.A @ factors.A.T, torch.eye(4, dtype=F64))


@pytest.mark.parametrize("method", METHODS)
def test_one_client(method: str) -> None:
    gen = make_generator(1)
    global_state = random_state(gen, DEFAULT_SHAPES, 4, head=HEAD_SHAPES)
    updates = random_updates(gen, DEFAULT_SHAPES, 4, 1, head=HEAD_SHAPES)
    result = aggregate(method, global_state, updates, AggregationSettings(SCALING, 4, None))
    for layer, factors in result.state.lora.items():
        # A single client's rank-4 update survives a rank-4 step exactly (fedsvd: with A_g).
        mine = updates[0].state.lora[layer]
        a = global_state.lora[layer].A if method == "fedsvd" else mine.A
        assert rel_err(product(factors), SCALING * mine.B @ a) <= TOL
    for key, tensor in updates[0].state.extra.items():
        assert torch.allclose(result.state.extra[key], tensor)


@pytest.mark.parametrize("method", METHODS)
def test_rank_larger_than_stacked_rank_pads(method: str) -> None:
    gen = make_generator(2)
    client_rank, rank, num_clients = 2, 7, 2  # K r_c = 4 < r = 7 (fedsvd: r_c = 2 < 7)
    global_state = random_state(gen, DEFAULT_SHAPES, client_rank)
    updates = random_updates(gen, DEFAULT_SHAPES, client_rank, num_clients)
    result = aggregate(method, global_state, updates, AggregationSettings(SCALING, rank, None))
    for layer, factors in result.state.lora.items():
        d, k = DEFAULT_SHAPES[layer]
        assert factors.B.shape == (d, rank) and factors.A.shape == (rank, k)
        assert bool(torch.isfinite(factors.A).all()) and bool(torch.isfinite(factors.B).all())
        u = result.reference_basis[layer]
        assert u.shape == (d, rank)
        assert rel_err(u.T @ u, torch.eye(rank, dtype=F64)) <= TOL
        # Nothing is truncated, so the step keeps the whole target.
        if method != "fedavg":
            target = dense_target(method, layer, global_state, updates, SCALING)
        else:
            p = weights_of(updates)
            b = sum(p[i] * u_.state.lora[layer].B for i, u_ in enumerate(updates))
            a = sum(p[i] * u_.state.lora[layer].A for i, u_ in enumerate(updates))
            target = SCALING * b @ a
        assert rel_err(product(factors), target) <= TOL


@pytest.mark.parametrize("method", REFACTORIZING)
def test_clip_disabled_keeps_norm_and_active_clip_hits_c(method: str) -> None:
    gen = make_generator(4)
    global_state = random_state(gen, DEFAULT_SHAPES, 4)
    updates = random_updates(gen, DEFAULT_SHAPES, 4, 3)
    free = aggregate(method, global_state, updates, AggregationSettings(SCALING, 4, None))
    clipped = aggregate(method, global_state, updates, AggregationSettings(SCALING, 4, 0.1))
    for layer in global_state.lora:
        target_norm = float(torch.linalg.matrix_norm(dense_target(method, layer, global_state, updates, SCALING)))
        assert target_norm > 0.1
        assert math.isclose(float(torch.linalg.matrix_norm(product(free.state.lora[layer]))), target_norm, rel_tol=TOL)
        assert math.isclose(float(torch.linalg.matrix_norm(product(clipped.state.lora[layer]))), 0.1, rel_tol=TOL)


def test_output_dtype_follows_global_state() -> None:
    gen = make_generator(5)
    global_state = random_state(gen, DEFAULT_SHAPES, 4, head=HEAD_SHAPES, dtype=torch.float32)
    updates = random_updates(gen, DEFAULT_SHAPES, 4, 3, head=HEAD_SHAPES, dtype=torch.float16)
    for method in METHODS:
        result = aggregate(method, global_state, updates, AggregationSettings(SCALING, 4, None))
        for layer, factors in result.state.lora.items():
            assert factors.A.dtype == factors.B.dtype == result.reference_basis[layer].dtype == torch.float32
        assert all(t.dtype == torch.float32 for t in result.state.extra.values())


def test_matches_dense_layer_step_on_a_wide_layer() -> None:
    """One bigger, very non-square layer (d = 3k) with K = 5: a hand-picked sanity case."""
    shapes = {"wide": (60, 20)}
    gen = make_generator(6)
    global_state = random_state(gen, shapes, 8)
    updates = random_updates(gen, shapes, 8, 5)
    for method in METHODS:
        config = AggregationSettings(SCALING, 8, 3.0)
        result = aggregate(method, global_state, updates, config)
        dense = dense_layer_step(method, "wide", global_state, updates, SCALING, 8, 3.0)
        assert rel_err(product(result.state.lora["wide"]), dense.product) <= TOL


# --------------------------------------------------------------------------- registry and validation


def test_registry_holds_each_method_s_step() -> None:
    assert set(STRATEGIES) == set(METHODS)
    for name, strategy in STRATEGIES.items():
        assert isinstance(strategy, Strategy) and strategy.name == name
    assert get_strategy("svd") is STRATEGIES["svd"]


def test_unknown_method_names_it_and_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'fedprox'.*fedavg.*subspace_reg"):
        get_strategy("fedprox")


def _setup(num_clients: int = 2) -> tuple[AdapterState, list[ClientUpdate]]:
    gen = make_generator(7)
    return (random_state(gen, DEFAULT_SHAPES, 4, head=HEAD_SHAPES),
            random_updates(gen, DEFAULT_SHAPES, 4, num_clients, head=HEAD_SHAPES))


def _replace(update: ClientUpdate, lora: dict | None = None, extra: dict | None = None,
             num_examples: int | None = None) -> ClientUpdate:
    state = AdapterState(lora={**update.state.lora, **(lora or {})}, extra=extra if extra is not None else update.state.extra)
    return ClientUpdate(client=update.client, num_examples=num_examples or update.num_examples, state=state)


def test_empty_updates_and_a_rank_the_layers_cannot_hold() -> None:
    global_state, updates = _setup()
    with pytest.raises(ValueError, match="empty"):
        aggregate("svd", global_state, [], AggregationSettings(SCALING, 4, None))
    with pytest.raises(ValueError, match=r"rank=10.*enc\.0\.query.*at most 9"):
        aggregate("svd", global_state, updates, AggregationSettings(SCALING, 10, None))
    with pytest.raises(ValueError, match=r"fedavg.*rank 4"):
        aggregate("fedavg", global_state, updates, AggregationSettings(SCALING, 2, None))


@pytest.mark.parametrize("kwargs, field", [
    ({"scaling": 0.0, "rank": 4, "max_update_norm": None}, "scaling"),
    ({"scaling": 2.0, "rank": 0, "max_update_norm": None}, "rank"),
    ({"scaling": 2.0, "rank": 4, "max_update_norm": 0.0}, "max_update_norm"),
    ({"scaling": 2.0, "rank": 4, "max_update_norm": -1.0}, "max_update_norm"),
])
def test_settings_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AggregationSettings(**kwargs)


def test_result_types() -> None:
    global_state, updates = _setup()
    result = aggregate("subspace_reg", global_state, updates, AggregationSettings(SCALING, 4, 1.0))
    assert isinstance(result, AggregationResult)
    assert set(result.reference_basis) == set(global_state.lora)
    assert set(result.state.extra) == set(global_state.extra)


def test_deterministic() -> None:
    global_state, updates = _setup(3)
    for method in METHODS:
        first = aggregate(method, global_state, updates, AggregationSettings(SCALING, 4, 1.0))
        second = aggregate(method, global_state, updates, AggregationSettings(SCALING, 4, 1.0))
        for layer in global_state.lora:
            assert torch.equal(first.state.lora[layer].B, second.state.lora[layer].B)
            assert torch.equal(first.state.lora[layer].A, second.state.lora[layer].A)
            assert torch.equal(first.reference_basis[layer], second.reference_basis[layer])


def test_registering_a_method_is_one_entry() -> None:
    from common.aggregation import RefactorizingStrategy, client_mixture_target, register, split_balanced

    name = "svd_copy_for_test"
    register(RefactorizingStrategy(name=name, target=client_mixture_target, split=split_balanced))
    try:
        global_state, updates = _setup()
        config = AggregationSettings(SCALING, 4, 1.0)
        mine, reference = aggregate(name, global_state, updates, config), aggregate("svd", global_state, updates, config)
        for layer in global_state.lora:
            assert torch.equal(mine.state.lora[layer].B, reference.state.lora[layer].B)
        with pytest.raises(ValueError, match="already registered"):
            register(STRATEGIES[name])
    finally:
        del STRATEGIES[name]


# --------------------------------------------------------------------------- layers batched by shape

# Three shape groups: three (12, 9) layers, two (9, 14) and one (7, 7) alone in its group.
MIXED_SHAPES = {"g.0": (12, 9), "h.0": (9, 14), "g.1": (12, 9), "single": (7, 7), "h.1": (9, 14), "g.2": (12, 9)}


def one_layer_at_a_time(method: str, global_state: AdapterState, updates: list[ClientUpdate],
                        config: AggregationSettings) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
    """The per-layer reference: the same step on each layer alone (a group of one), as a Python loop."""
    lora, basis = {}, {}
    for layer in global_state.lora:
        alone = aggregate(method, AdapterState(lora={layer: global_state.lora[layer]}),
                          [ClientUpdate(client=u.client, num_examples=u.num_examples,
                                        state=AdapterState(lora={layer: u.state.lora[layer]})) for u in updates],
                          config)
        lora[layer], basis[layer] = alone.state.lora[layer], alone.reference_basis[layer]
    return lora, basis


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_clients", [1, 3, 10])
@pytest.mark.parametrize("clip", ["none", "active"])
def test_layers_batched_by_shape_equal_each_layer_alone(method: str, num_clients: int, clip: str) -> None:
    """Layers of one shape are aggregated as one batched stack; each layer's factors and basis, signs
    included, equal the same step on that layer alone, to float64 rounding, in the adapter's order."""
    gen = make_generator(10 + num_clients)
    global_state = random_state(gen, MIXED_SHAPES, 4, head=HEAD_SHAPES)
    updates = random_updates(gen, MIXED_SHAPES, 4, num_clients, head=HEAD_SHAPES)
    assert len({u.num_examples for u in updates}) == num_clients  # unequal weights
    norms = [float(torch.linalg.matrix_norm(dense_target(method, layer, global_state, updates, SCALING)))
             for layer in MIXED_SHAPES]
    config = AggregationSettings(SCALING, 4, None if clip == "none" else 0.5 * sorted(norms)[len(norms) // 2])
    result = aggregate(method, global_state, updates, config)
    lora, basis = one_layer_at_a_time(method, global_state, updates, config)
    assert list(result.state.lora) == list(result.reference_basis) == list(global_state.lora)
    for layer in global_state.lora:
        for batched, alone in [(result.state.lora[layer].A, lora[layer].A), (result.state.lora[layer].B, lora[layer].B),
                               (result.reference_basis[layer], basis[layer])]:
            assert batched.shape == alone.shape and batched.is_contiguous()
            assert torch.allclose(batched, alone, rtol=0, atol=1e-13 * float(alone.abs().max()))


def test_batched_outputs_do_not_share_memory() -> None:
    """Each layer's result is a tensor of its own (not a view into its group's stack), in float64 too."""
    gen = make_generator(11)
    global_state = random_state(gen, MIXED_SHAPES, 4)
    result = aggregate("subspace_reg", global_state, random_updates(gen, MIXED_SHAPES, 4, 3), AggregationSettings(SCALING, 4, None))
    storages = [t.untyped_storage().data_ptr() for layer in MIXED_SHAPES
                for t in (result.state.lora[layer].A, result.state.lora[layer].B, result.reference_basis[layer])]
    assert len(set(storages)) == len(storages)


@pytest.mark.parametrize("method", METHODS)
def test_inputs_are_left_as_they_were(method: str) -> None:
    """The QRs overwrite the group's own float64 stacks, never the caller's tensors: the global state and
    every update are bit for bit what they were, float64 ones (which stacking does not copy by dtype) too."""
    gen = make_generator(12)
    global_state = random_state(gen, MIXED_SHAPES, 4, head=HEAD_SHAPES)
    updates = random_updates(gen, MIXED_SHAPES, 4, 3, head=HEAD_SHAPES)
    before = [t.clone() for s in [global_state] + [u.state for u in updates] for f in s.lora.values() for t in (f.A, f.B)]
    aggregate(method, global_state, updates, AggregationSettings(SCALING, 4, None))
    after = [t for s in [global_state] + [u.state for u in updates] for f in s.lora.values() for t in (f.A, f.B)]
    assert after[0].dtype == F64
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_qr_in_place_equals_the_copying_qr() -> None:
    """Overwriting the stack with LAPACK's reflectors gives geqrf's exact output (what the copying call gives)."""
    from common.aggregation import _householder_qr

    stack = torch.randn(5, 6, 40, generator=make_generator(13), dtype=F64).mT  # (n, 40, 6), column-major
    copying = _householder_qr(stack)
    in_place = _householder_qr(stack.clone().mT.contiguous().mT, overwrite=True)
    for x, y in zip(copying, in_place):
        assert torch.equal(x, y)
