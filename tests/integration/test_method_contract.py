"""The method contract (common/methods/): a method defined in this file runs through a real federation with
no edit anywhere else, and each built-in method's wire (each fact once) gives the same global adapter as
the former wire (subspace_reg sent B_g beside U; fedsvd uploaded the A it kept frozen)."""

from __future__ import annotations

import os

import pytest
import torch

from common.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX, REFERENCE_SUFFIX, AdapterState, ClientUpdate
from common.aggregation import AggregationSettings, FedAvg as FedAvgStep
from common.codec import decode_tensors, encode_tensors
from common.config import RunConfig
from common.federated_data import partition_dataset
from common.methods import PLUGIN_ENV, LocalObjective, Method, Recipient, get_method, register
from common.methods.fedsvd import FedSvd
from common.methods.subspace_reg import SubspaceReg
from common.tasks import load_task_data
from common.validation import ExpectedTensors
from tests.integration.conftest import run_federation, tiny_run_config

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- a new method, in this file only


class FedAvgOfB(Method):
    """FedAvg of B only: A stays at its shared initialisation, clients train and upload B (and the head)."""

    name = "fedavg_of_b"
    label = "FedAvg (B only)"
    strategy = FedAvgStep()

    def expected_upload(self, adapter, round_index):
        return ExpectedTensors.like({k: v for k, v in adapter.items() if not k.endswith(LORA_A_SUFFIX)})

    def complete_upload(self, adapter, upload):
        return {**upload, **{k: v for k, v in adapter.items() if k.endswith(LORA_A_SUFFIX)}}

    def local_objective(self, received, config, round_index):
        return LocalObjective(start=dict(received), train_a=False)

    def upload(self, trained, round_index):
        return {k: v for k, v in trained.items() if not k.endswith(LORA_A_SUFFIX)}


register(FedAvgOfB())


def test_a_method_defined_in_a_test_file_runs_through_a_real_federation(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(PLUGIN_ENV, __name__)       # the coordinator and the clients import this module
    run = run_federation(tmp_path, tiny_run_config(tiny_model_dir, method="fedavg_of_b", num_rounds=2))
    initial = AdapterState.from_state_dict(_received(run, 0, 1))
    final = AdapterState.from_state_dict(_adapter_file(run.run_dir / "adapters" / "round_002"))
    for layer, factors in final.lora.items():
        assert torch.equal(factors.A, initial.lora[layer].A), layer           # A never moved
    assert any(not torch.equal(f.B, initial.lora[layer].B) for layer, f in final.lora.items())   # B trained
    uploads = [m["bytes_up"] for m in _metrics(run)]
    downloads = [m["bytes_down"] for m in _metrics(run)]
    assert all(up * 3 < down * 2 for up, down in zip(uploads, downloads))    # no A in any upload


def _received(run, client: int, round_index: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run.received_dirs[client] / f"round_{round_index:03d}.safetensors"))


def _adapter_file(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k.replace(".default", ""): v for k, v in load_file(str(directory / "adapter_model.safetensors")).items()}


def _metrics(run) -> list[dict]:
    import json

    return [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the former wire, as methods


class SubspaceRegFormerWire(SubspaceReg):
    """What subspace_reg sent before: the whole global adapter (B_g included) and U beside it."""

    name = "subspace_reg_former_wire"

    def task_tensors(self, adapter, state, recipient):
        return {**adapter, **{k: v for k, v in state.items() if k.endswith(REFERENCE_SUFFIX)}}

    def expected_task(self, adapter):
        optional = {n[: -len(LORA_B_SUFFIX)] + REFERENCE_SUFFIX: tuple(t.shape)
                    for n, t in adapter.items() if n.endswith(LORA_B_SUFFIX)}
        return ExpectedTensors(ExpectedTensors.like(adapter).required, optional)

    def local_objective(self, received, config, round_index):
        adapter = {k: v for k, v in received.items() if not k.endswith(REFERENCE_SUFFIX)}    # U was dropped
        return super().local_objective(adapter, config, round_index)


class FedSvdFormerWire(FedSvd):
    """What fedsvd uploaded before: A too, although the client kept it frozen."""

    name = "fedsvd_former_wire"

    def expected_upload(self, adapter, round_index):
        return ExpectedTensors.like(adapter)

    def complete_upload(self, adapter, upload):
        return upload

    def upload(self, trained, round_index):
        return trained


register(SubspaceRegFormerWire())
register(FedSvdFormerWire())
FORMER = {"fedavg": "fedavg", "svd": "svd", "fedsvd": "fedsvd_former_wire", "subspace_reg": "subspace_reg_former_wire"}


def _simulate(model_dir: str, method_name: str, rounds: int = 3, clients: int = 2) -> tuple[dict, list[int]]:
    """Every step of a federation but the sockets: task -> bytes -> client training -> upload -> bytes ->
    coordinator's completion -> server step, with one seed. Returns the final adapter and bytes per round."""
    from client.trainer import LocalTrainer

    config = RunConfig.from_flat(tiny_run_config(model_dir, method=method_name, num_clients=clients,
                                                 max_local_steps=4))
    data = load_task_data(config.data, seed=config.federation.seed)
    parts = partition_dataset(config, data.partition_values).indices
    trainers = [LocalTrainer(config, [data.train[i] for i in part], len(data.label_names), show_progress=False)
                for part in parts]
    method = get_method(method_name)
    adapter = {k: v.float() for k, v in trainers[0].built.get_adapter_state().items()}
    state: dict[str, torch.Tensor] = {}
    settings = AggregationSettings(scaling=config.model.scaling, rank=config.model.lora_rank,
                                   max_update_norm=config.federation.max_effective_lora_update_norm)
    wire_bytes = []
    for round_index in range(1, rounds + 1):
        specs, buffer = encode_tensors(method.task_tensors(adapter, state, Recipient(round_index, rank=config.model.lora_rank)))
        updates, sent = [], len(buffer) * clients
        for index, trainer in enumerate(trainers):
            received = decode_tensors(specs, buffer)
            trainer.expected_task().check_specs(specs, "coordinator")
            result = trainer.train_round(round_index, received, seed=1000 * round_index + index)
            up_specs, up_buffer = encode_tensors(result.tensors)
            sent += len(up_buffer)
            method.expected_upload(adapter, round_index).check_specs(up_specs, f"client {index}")
            whole = method.complete_upload(adapter, decode_tensors(up_specs, up_buffer))
            updates.append(ClientUpdate(f"client-{index}", result.num_examples, AdapterState.from_state_dict(whole)))
        step = method.server_step(adapter, state, updates, settings, round_index)
        adapter = {k: v.float() for k, v in step.adapter.to_state_dict().items()}
        state = {k: v.float() for k, v in step.state.items()}
        wire_bytes.append(sent)
    return adapter, wire_bytes


@pytest.mark.parametrize("method", sorted(FORMER))
def test_the_wire_carrying_each_fact_once_gives_the_same_global_adapter_as_the_former_wire(tiny_model_dir, method):
    os.environ.pop(PLUGIN_ENV, None)
    now, now_bytes = _simulate(tiny_model_dir, method)
    before, before_bytes = _simulate(tiny_model_dir, FORMER[method])
    assert now.keys() == before.keys()
    for name in now:
        assert torch.allclose(now[name], before[name], rtol=1e-5, atol=1e-7), (method, name)
    if method in ("fedsvd", "subspace_reg"):
        assert sum(now_bytes) < sum(before_bytes), (now_bytes, before_bytes)
    else:
        assert now_bytes == before_bytes


def test_the_registry_is_the_one_list_of_methods():
    import subprocess
    import sys

    from common.config import ConfigError, RunConfig
    from common.methods import method_names
    from experiments.report import method_label
    from tests.integration.harness import ROOT

    assert "fedavg_of_b" in method_names() and method_label("fedavg_of_b") == "FedAvg (B only)"
    assert RunConfig.from_flat({"method": "fedavg_of_b"}).federation.method == "fedavg_of_b"
    with pytest.raises(ConfigError, match="use one of fedavg, svd, fedsvd, subspace_reg"):
        RunConfig.from_flat({"method": "fedprox"})
    shown = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, PLUGIN_ENV: __name__}).stdout
    assert "fedavg_of_b" in shown.replace("\n", " ") and "subspace_reg" in shown
