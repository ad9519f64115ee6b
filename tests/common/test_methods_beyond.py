"""FFA-LoRA, RoLoRA, FedEx-LoRA, heterogeneous client ranks and the reduced-precision wire, against dense
references (the products formed, float64) and the properties each method promises (docs/DESIGN.md §4.0,
§4.2, §4.11-§4.13)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.adapter import (LORA_A_SUFFIX, LORA_B_SUFFIX, REFERENCE_GAIN_SUFFIX, REFERENCE_SUFFIX, AdapterState,
                            ClientUpdate, LoraFactors, pad_to_rank, truncate_to_rank)
from common.aggregation import AggregationSettings
from common.methods import Recipient, get_method
from common.methods.fedex_lora import (LOG_PREFIX, RESIDUAL_A_SUFFIX, RESIDUAL_B_SUFFIX, RESIDUAL_DENSE_SUFFIX,
                                       base_residual_through, read_log)
from common.methods.rolora import trains_b

F64 = torch.float64
LAYERS = {"enc.0.q": (40, 30), "enc.0.v": (24, 30)}     # layer -> (d, k)
RANK = 4
SCALING = 2.0


def _settings(rank: int = RANK, wire: torch.dtype = F64, clip=None) -> AggregationSettings:
    return AggregationSettings(scaling=SCALING, rank=rank, max_update_norm=clip, wire_dtype=wire)


def _adapter(generator: torch.Generator, rank: int = RANK, dtype=F64, zero_b: bool = False) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer, (d, k) in LAYERS.items():
        tensors[layer + LORA_A_SUFFIX] = torch.randn(rank, k, generator=generator, dtype=dtype) * 0.3
        b = torch.randn(d, rank, generator=generator, dtype=dtype) * 0.3
        tensors[layer + LORA_B_SUFFIX] = torch.zeros_like(b) if zero_b else b
    tensors["head.weight"] = torch.randn(5, 8, generator=generator, dtype=dtype)
    return tensors


def _perturb(tensors: dict[str, torch.Tensor], generator: torch.Generator, frozen: tuple[str, ...] = ()) -> dict:
    """A client's "training": every tensor moved, except those it holds frozen."""
    return {name: t if name.endswith(frozen) else t + 0.1 * torch.randn(t.shape, generator=generator, dtype=t.dtype)
            for name, t in tensors.items()}


def _update(name: str, n: int, tensors: dict[str, torch.Tensor]) -> ClientUpdate:
    return ClientUpdate(name, n, AdapterState.from_state_dict(tensors))


def _product(tensors: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    return SCALING * tensors[layer + LORA_B_SUFFIX].to(F64) @ tensors[layer + LORA_A_SUFFIX].to(F64)   # (d, k)


def _weights(updates: list[ClientUpdate]) -> list[float]:
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def _round_trip(method_name: str, adapter, state, uploads_by_client, round_index, rank=RANK, settings_=None):
    """What the coordinator does with uploads: validate against expected_upload, complete, pad, server step."""
    method = get_method(method_name)
    updates = []
    for name, n, upload in uploads_by_client:
        held = truncate_to_rank(adapter, _rank_of(upload))            # the global adapter at the client's rank
        method.expected_upload(held, round_index).check_specs([_spec(k, v) for k, v in upload.items()], name)
        whole = pad_to_rank(method.complete_upload(held, upload), rank)
        updates.append(_update(name, n, whole))
    return method.server_step(adapter, state, updates, settings_ or _settings(rank), round_index), updates


def _rank_of(upload: dict[str, torch.Tensor]) -> int:
    for name, tensor in upload.items():
        if name.endswith(LORA_A_SUFFIX):
            return tensor.shape[0]
        if name.endswith(LORA_B_SUFFIX):
            return tensor.shape[1]
    return RANK


def _spec(name, tensor):
    from common.codec import TensorSpec
    return TensorSpec(name, "float32", tuple(tensor.shape), 0, 4 * tensor.numel())


# --------------------------------------------------------------------------- FFA-LoRA


def test_ffa_lora_averages_b_keeps_a_bit_for_bit_and_is_exact_over_rounds():
    g = torch.Generator().manual_seed(0)
    method = get_method("ffa_lora")
    adapter, state = _adapter(g, zero_b=True), {}
    initial_a = {k: v.clone() for k, v in adapter.items() if k.endswith(LORA_A_SUFFIX)}
    for round_index in range(1, 4):
        received = method.task_tensors(adapter, state, Recipient(round_index, RANK))
        objective = method.local_objective(received, None, round_index)
        assert objective.train_a is False and objective.train_b is True
        uploads = []
        for i, n in enumerate((10, 30, 25)):
            trained = _perturb(objective.start, g, frozen=(LORA_A_SUFFIX,))
            upload = method.upload(trained, round_index)
            assert not any(k.endswith(LORA_A_SUFFIX) for k in upload)                # B only (and the head)
            uploads.append((f"c{i}", n, upload))
        step, updates = _round_trip("ffa_lora", adapter, state, uploads, round_index)
        new = step.adapter.to_state_dict()
        for name, a in initial_a.items():
            assert torch.equal(new[name], a), name                                     # A never changes
        for layer in LAYERS:
            exact = sum(p * _product(u.state.to_state_dict(), layer) for p, u in zip(_weights(updates), updates))
            torch.testing.assert_close(_product(new, layer), exact, rtol=0, atol=1e-10)   # exact: A is shared
        adapter, state = new, step.state


# --------------------------------------------------------------------------- RoLoRA


@pytest.mark.parametrize("round_index", [1, 2, 3, 4])
def test_rolora_trains_one_factor_per_round_and_keeps_the_other_bit_for_bit(round_index):
    g = torch.Generator().manual_seed(round_index)
    method = get_method("rolora")
    adapter = _adapter(g)
    objective = method.local_objective(method.task_tensors(adapter, {}, Recipient(round_index, RANK)), None, round_index)
    b_round = trains_b(round_index)
    assert b_round == (round_index % 2 == 1)                     # odd rounds B (zero at the start), even rounds A
    assert (objective.train_a, objective.train_b) == (not b_round, b_round)
    frozen = LORA_A_SUFFIX if b_round else LORA_B_SUFFIX
    uploads = []
    for i, n in enumerate((12, 7)):
        upload = method.upload(_perturb(objective.start, g, frozen=(frozen,)), round_index)
        assert not any(k.endswith(frozen) for k in upload)      # only the trained factor travels
        uploads.append((f"c{i}", n, upload))
    step, updates = _round_trip("rolora", adapter, {}, uploads, round_index)
    new = step.adapter.to_state_dict()
    for name in adapter:
        if name.endswith(frozen):
            assert torch.equal(new[name], adapter[name]), name   # the untrained factor, bit for bit
    for layer in LAYERS:
        exact = sum(p * _product(u.state.to_state_dict(), layer) for p, u in zip(_weights(updates), updates))
        torch.testing.assert_close(_product(new, layer), exact, rtol=0, atol=1e-10)


def test_rolora_upload_of_the_wrong_factor_is_refused():
    from common.validation import PayloadRejected

    adapter = _adapter(torch.Generator().manual_seed(1))
    with pytest.raises(PayloadRejected, match="unexpected"):
        get_method("rolora").expected_upload(adapter, 2).check_specs([_spec(k, v) for k, v in adapter.items()], "c")


# --------------------------------------------------------------------------- FedEx-LoRA


class FedExClient:
    """A client's model: its own copy of each layer's base weight W (d, k), float64, and its LoRA factors."""

    def __init__(self, base: dict[str, torch.Tensor]) -> None:
        self.base = {layer: w.clone() for layer, w in base.items()}
        self.residual_round = 0
        self.tensors: dict[str, torch.Tensor] = {}
        self.dense_deliveries = 0

    def receive(self, method, received: dict[str, torch.Tensor], round_index: int) -> None:
        objective = method.local_objective(received, None, round_index)
        for layer, delta in objective.base_delta.items():
            if isinstance(delta, tuple):
                delta = delta[0].to(F64) @ delta[1].to(F64)
            else:
                self.dense_deliveries += 1
            self.base[layer] = self.base[layer] + delta
        self.residual_round = round_index - 1
        self.tensors = objective.start

    def effective(self, layer: str) -> torch.Tensor:
        return self.base[layer] + _product(self.tensors, layer)


def test_fedex_lora_global_model_is_the_exact_mean_of_the_client_models_over_rounds_with_skipped_clients():
    g = torch.Generator().manual_seed(3)
    method = get_method("fedex_lora")
    base = {layer: torch.randn(d, k, generator=g, dtype=F64) for layer, (d, k) in LAYERS.items()}
    evaluator = {layer: w.clone() for layer, w in base.items()}          # the coordinator's evaluation model
    clients = [FedExClient(base) for _ in range(4)]
    adapter, state = _adapter(g, zero_b=True), {}
    # Client 3 skips rounds 1-4 and joins in round 5: it catches up on four rounds' residual at once.
    schedule = {1: [0, 1], 2: [1, 2], 3: [0, 2], 4: [0, 1, 2], 5: [3, 1], 6: [2, 3]}
    sizes = [10, 25, 40, 17]
    for round_index, sampled in schedule.items():
        uploads = []
        for i in sampled:
            client = clients[i]
            task = method.task_tensors(adapter, state, Recipient(round_index, RANK, client.residual_round))
            method.expected_task({k: v.float() for k, v in adapter.items()}).check_specs(
                [_spec(k, v) for k, v in task.items()], "coordinator")
            client.receive(method, task, round_index)
            for layer in LAYERS:                      # caught up: the client's base is the evaluator's
                torch.testing.assert_close(client.base[layer], evaluator[layer], rtol=0, atol=1e-9)
            client.tensors = _perturb(client.tensors, g)
            uploads.append((f"c{i}", sizes[i], method.upload(client.tensors, round_index)))
        step, updates = _round_trip("fedex_lora", adapter, state, uploads, round_index)
        for layer, (b_res, a_res) in step.base_increment.items():
            assert b_res.shape[1] == a_res.shape[0] == (len(sampled) + 1) * RANK      # (K+1) r, as factors
            evaluator[layer] = evaluator[layer] + b_res @ a_res
        adapter, state = step.adapter.to_state_dict(), step.state
        p = [sizes[i] / sum(sizes[j] for j in sampled) for i in sampled]
        for layer in LAYERS:
            mean_model = sum(w * clients[i].effective(layer) for w, i in zip(p, sampled))
            global_model = evaluator[layer] + _product(adapter, layer)
            torch.testing.assert_close(global_model, mean_model, rtol=0, atol=1e-10)   # float64 rounding
    assert clients[3].dense_deliveries == len(LAYERS)        # 4 rounds of (K+1) r columns: the dense sum was smaller
    assert sorted(read_log(state)) == list(schedule)         # every round's increment is in the kept state
    assert method.base_increments(state)[0].keys() == set(LAYERS)
    merged = base_residual_through(state, len(schedule))      # what a user adds to rebuild the evaluated model
    for layer in LAYERS:
        torch.testing.assert_close(base[layer] + merged[layer], evaluator[layer], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="the residual log ends at round 6"):
        base_residual_through(state, 7)


def test_fedex_lora_residual_of_a_round_equals_the_dense_formula():
    g = torch.Generator().manual_seed(5)
    adapter = _adapter(g)
    uploads = [(f"c{i}", n, _perturb(adapter, g)) for i, n in enumerate((3, 9, 4))]
    step, updates = _round_trip("fedex_lora", adapter, {}, uploads, 1)
    p = _weights(updates)
    new = step.adapter.to_state_dict()
    for layer in LAYERS:
        residual = sum(w * _product(u.state.to_state_dict(), layer) for w, u in zip(p, updates)) - _product(new, layer)
        b_res, a_res = step.base_increment[layer]
        torch.testing.assert_close(b_res @ a_res, residual, rtol=0, atol=1e-12)
        # A_g and B_g are the plain means (fedavg).
        torch.testing.assert_close(new[layer + LORA_A_SUFFIX],
                                   sum(w * u.state.lora[layer].A for w, u in zip(p, updates)), rtol=0, atol=1e-12)


def test_fedex_lora_task_carries_only_the_rounds_a_client_lacks():
    g = torch.Generator().manual_seed(6)
    method = get_method("fedex_lora")
    adapter, state = _adapter(g), {}
    for round_index in (1, 2):
        step, _ = _round_trip("fedex_lora", adapter, state, [("a", 5, _perturb(adapter, g)), ("b", 6, _perturb(adapter, g))],
                              round_index)
        adapter, state = step.adapter.to_state_dict(), step.state
    up_to_date = method.task_tensors(adapter, state, Recipient(3, RANK, base_residual_round=2))
    assert up_to_date.keys() == adapter.keys()                          # nothing pending: the adapter alone
    one_behind = method.task_tensors(adapter, state, Recipient(3, RANK, base_residual_round=1))
    layer = "enc.0.q"
    assert one_behind[layer + RESIDUAL_B_SUFFIX].shape == (40, 3 * RANK)   # round 2 only: (K+1) r = 12 < 40*30/70
    b2, a2 = read_log(state)[2][layer]
    assert torch.equal(one_behind[layer + RESIDUAL_B_SUFFIX], b2) and torch.equal(one_behind[layer + RESIDUAL_A_SUFFIX], a2)
    fresh = method.task_tensors(adapter, state, Recipient(3, RANK, base_residual_round=0))
    assert layer + RESIDUAL_DENSE_SUFFIX in fresh                     # 24 columns > 17.1: the dense sum is smaller
    dense = sum(b.to(F64) @ a.to(F64) for b, a in (read_log(state)[1][layer], read_log(state)[2][layer]))
    torch.testing.assert_close(fresh[layer + RESIDUAL_DENSE_SUFFIX], dense, rtol=0, atol=1e-12)
    assert all(k.startswith(LOG_PREFIX) or k.endswith(REFERENCE_SUFFIX) for k in state)


def test_fedex_lora_unpaired_residual_factors_are_refused_by_name():
    method = get_method("fedex_lora")
    received = {"l.base_residual_B": torch.zeros(4, 3), "l.base_residual_A": torch.zeros(2, 5)}
    with pytest.raises(ValueError, match="do not pair up"):
        method.local_objective(received, None, 2)


# --------------------------------------------------------------------------- heterogeneous ranks


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.sampled_from([1, 2, 3, 4]), min_size=2, max_size=4),
       method_name=st.sampled_from(["svd", "subspace_reg"]))
def test_mixed_rank_uploads_aggregate_exactly_like_the_dense_mixture(seed, ranks, method_name):
    """svd / subspace_reg on rank-r_i clients: the target sum p_i s B_i A_i, formed densely, and its top-r
    part are what the server step produces (FlexLoRA-style), whatever the mix of ranks."""
    g = torch.Generator().manual_seed(seed)
    adapter = _adapter(g)
    uploads, dense = [], {layer: 0.0 for layer in LAYERS}
    sizes = [int(torch.randint(5, 50, (1,), generator=g)) for _ in ranks]
    for i, (r_i, n) in enumerate(zip(ranks, sizes)):
        received = truncate_to_rank(adapter, r_i)
        trained = _perturb(received, g)
        uploads.append((f"c{i}", n, trained))
        for layer in LAYERS:
            dense[layer] = dense[layer] + n / sum(sizes) * _product(trained, layer)
    step, _ = _round_trip(method_name, adapter, {}, uploads, 1)
    new = step.adapter.to_state_dict()
    for layer in LAYERS:
        u, s, vh = torch.linalg.svd(dense[layer])
        top = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        gain_free = _product(new, layer) * (torch.linalg.norm(top) / torch.linalg.norm(_product(new, layer)))
        torch.testing.assert_close(gain_free, top, rtol=1e-6, atol=1e-6)


def test_a_low_rank_client_receives_exactly_the_top_part_of_the_global_factors_and_reference():
    g = torch.Generator().manual_seed(8)
    method = get_method("subspace_reg")
    adapter = _adapter(g)
    uploads = [(f"c{i}", 10 + i, _perturb(adapter, g)) for i in range(3)]
    step, _ = _round_trip("subspace_reg", adapter, {}, uploads, 1)
    full = method.task_tensors(step.adapter.to_state_dict(), step.state, Recipient(2, RANK))
    low = truncate_to_rank(full, 2)
    for layer in LAYERS:
        assert torch.equal(low[layer + LORA_A_SUFFIX], full[layer + LORA_A_SUFFIX][:2])
        assert torch.equal(low[layer + REFERENCE_SUFFIX], full[layer + REFERENCE_SUFFIX][:, :2])
        assert torch.equal(low[layer + REFERENCE_GAIN_SUFFIX], full[layer + REFERENCE_GAIN_SUFFIX])
        # The top-2 part is the best rank-2 approximation of the global product (SVD-ordered factors).
        product = _product(step.adapter.to_state_dict(), layer)
        u, s, vh = torch.linalg.svd(product)
        b_low = low[layer + REFERENCE_GAIN_SUFFIX].to(F64) * low[layer + REFERENCE_SUFFIX].to(F64)
        torch.testing.assert_close(SCALING * b_low @ low[layer + LORA_A_SUFFIX].to(F64), (u[:, :2] * s[:2]) @ vh[:2],
                                   rtol=1e-5, atol=1e-5)


def test_fedavg_zero_pads_low_rank_uploads_hetlora_style():
    g = torch.Generator().manual_seed(9)
    adapter = _adapter(g)
    low = _perturb(truncate_to_rank(adapter, 2), g)
    high = _perturb(adapter, g)
    step, _ = _round_trip("fedavg", adapter, {}, [("low", 10, low), ("high", 30, high)], 1)
    new = step.adapter.to_state_dict()
    for layer in LAYERS:
        a_low = torch.cat([low[layer + LORA_A_SUFFIX], torch.zeros(2, LAYERS[layer][1], dtype=F64)])
        torch.testing.assert_close(new[layer + LORA_A_SUFFIX], 0.25 * a_low + 0.75 * high[layer + LORA_A_SUFFIX],
                                   rtol=0, atol=1e-12)
    padded = pad_to_rank(low, RANK)
    for layer in LAYERS:                                                # padding leaves each product unchanged
        assert torch.equal(_product(padded, layer), _product(low, layer))


# --------------------------------------------------------------------------- the wire dtype


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method_name", ["fedavg", "svd", "fedsvd", "subspace_reg", "ffa_lora", "rolora", "fedex_lora"])
def test_a_reduced_precision_wire_keeps_the_global_adapter_at_what_the_wire_carries(method_name, wire):
    g = torch.Generator().manual_seed(10)
    method = get_method(method_name)
    adapter = {k: v.float().to(wire).float() for k, v in _adapter(g).items()}
    uploads = [(f"c{i}", 5 + i, {k: v.to(wire).float() for k, v in method.upload(_perturb(adapter, g), 2).items()})
               for i in range(3)]
    step, _ = _round_trip(method_name, adapter, {}, uploads, 2, settings_=_settings(wire=wire))
    for name, tensor in step.adapter.to_state_dict().items():
        if method_name == "subspace_reg" and name.endswith(LORA_B_SUFFIX):
            continue                                                    # B_g = g U, formed from the rounded U and g
        assert torch.equal(tensor.to(wire).to(tensor.dtype), tensor), name
    if method_name == "subspace_reg":
        for layer in LAYERS:
            basis, gain = step.state[layer + REFERENCE_SUFFIX], step.state[layer + REFERENCE_GAIN_SUFFIX]
            assert torch.equal(basis.to(wire).float(), basis) and torch.equal(gain.to(wire).float(), gain)
            assert torch.equal(step.adapter.lora[layer].B, gain * basis)
    reference, _ = _round_trip(method_name, adapter, {}, uploads, 2, settings_=_settings(wire=torch.float32))
    for name, tensor in reference.adapter.to_state_dict().items():   # rounding is all that differs
        other = step.adapter.to_state_dict()[name]
        scale = float(tensor.abs().max()) or 1.0
        assert float((other - tensor).abs().max()) <= 2 ** -6 * scale, name


def test_a_float32_wire_changes_nothing():
    g = torch.Generator().manual_seed(11)
    adapter = {k: v.float() for k, v in _adapter(g).items()}
    uploads = [(f"c{i}", 5 + i, _perturb(adapter, g)) for i in range(3)]
    for method_name in ("svd", "subspace_reg"):
        method = get_method(method_name)
        updates = [_update(n, k, t) for n, k, t in uploads]
        default = method.server_step(adapter, {}, updates, AggregationSettings(scaling=SCALING, rank=RANK,
                                                                              max_update_norm=None), 1)
        explicit = method.server_step(adapter, {}, updates, _settings(wire=torch.float32), 1)
        for name, tensor in default.adapter.to_state_dict().items():
            assert torch.equal(tensor, explicit.adapter.to_state_dict()[name]), name


def test_truncation_and_padding_shapes():
    tensors = {"l" + LORA_A_SUFFIX: torch.ones(4, 7), "l" + LORA_B_SUFFIX: torch.ones(9, 4),
               "l" + REFERENCE_SUFFIX: torch.ones(9, 4), "l" + REFERENCE_GAIN_SUFFIX: torch.tensor(2.0),
               "l" + RESIDUAL_B_SUFFIX: torch.ones(9, 12), "l" + RESIDUAL_A_SUFFIX: torch.ones(12, 7),
               "head.weight": torch.ones(3, 4)}
    low = truncate_to_rank(tensors, 2)
    assert {k: tuple(v.shape) for k, v in low.items()} == {
        "l" + LORA_A_SUFFIX: (2, 7), "l" + LORA_B_SUFFIX: (9, 2), "l" + REFERENCE_SUFFIX: (9, 2),
        "l" + REFERENCE_GAIN_SUFFIX: (), "l" + RESIDUAL_B_SUFFIX: (9, 12), "l" + RESIDUAL_A_SUFFIX: (12, 7),
        "head.weight": (3, 4)}
    back = pad_to_rank({k: v for k, v in low.items() if k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))}, 4)
    assert back["l" + LORA_A_SUFFIX].shape == (4, 7) and back["l" + LORA_B_SUFFIX].shape == (9, 4)
    assert torch.equal(back["l" + LORA_A_SUFFIX][2:], torch.zeros(2, 7))


def test_layer_factors_type_is_used():   # keeps LoraFactors imported for readers following the types
    assert LoraFactors(A=torch.zeros(1, 2), B=torch.zeros(3, 1)).rank == 1
