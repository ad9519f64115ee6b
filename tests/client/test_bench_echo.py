"""The --bench-echo client's uploads pass every check a coordinator makes on a real client's."""

import pytest
import torch

from client.bench_echo import EchoTrainer
from client.connection import ClientSetupError
from common.adapter import truncate_to_rank
from common.config import RunConfig
from common.methods import Recipient, get_method
from common.synthetic import synthetic_adapter


def _config(method: str) -> RunConfig:
    return RunConfig.from_flat({"synthetic_layout": "encoder:1x8x16", "lora_rank": 4, "method": method,
                                "num_clients": 2, "seed": 3})


@pytest.mark.parametrize("method", ["fedavg", "svd", "fedsvd", "subspace_reg", "ffa_lora", "rolora"])
def test_an_echo_upload_is_what_the_coordinator_expects_and_differs(method):
    config = _config(method)
    adapter = synthetic_adapter("encoder:1x8x16", 4, 3)
    echo = EchoTrainer(config, rank=4, partition=1, num_partitions=2)
    task = get_method(method).task_tensors(adapter, {}, Recipient(round=1, rank=4))
    echo.expected_task().check_specs([_spec(n, t) for n, t in task.items()], "test")
    result = echo.train_round(1, task, seed=11)
    expected = get_method(method).expected_upload(truncate_to_rank(adapter, 4), 1)
    expected.check_specs([_spec(n, t) for n, t in result.tensors.items()], "echo")
    expected.check_values(result.tensors, "echo", max_norm=1e4)
    assert result.num_examples == 100
    assert any(not torch.equal(result.tensors[n], adapter[n]) for n in result.tensors)
    again = echo.train_round(1, task, seed=11).tensors
    assert all(torch.equal(again[n], result.tensors[n]) for n in again)       # deterministic


def test_echo_refuses_a_real_run():
    with pytest.raises(ClientSetupError, match="synthetic_layout"):
        EchoTrainer(RunConfig.from_flat({"method": "fedavg"}), rank=8, partition=0, num_partitions=10)


def _spec(name, tensor):
    from common.codec import encode_tensors

    return encode_tensors({name: tensor})[0][0]
