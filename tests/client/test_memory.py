"""client/memory.py: glibc told to give freed memory back, and training exactly as before.

The before / after comparison runs each side in a fresh process: glibc's mmap threshold is process-wide
and, once fixed, stays fixed, so only a new process shows the allocator as it was before the change.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from client import memory

ROOT = Path(__file__).resolve().parents[2]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

TRAIN_TWO_ROUNDS = """
import json, sys
import torch
import client.trainer as trainer_module
from client.trainer import LocalTrainer
from common.config import RunConfig
from common.tasks import load_task_data

spec = json.loads(sys.argv[1])
if not spec["tuned"]:                                   # the allocator as it was before client/memory.py
    trainer_module.fix_mmap_threshold = lambda: False
    trainer_module.release_free_memory = lambda: False
torch.set_num_threads(1)
config = RunConfig.load("configs/minilm_bbc.yaml", spec["overrides"])
data = load_task_data(config.data, seed=config.federation.seed)
trainer = LocalTrainer(config, data.train[:64], len(data.label_names), show_progress=False)
task = trainer.built.get_adapter_state()
losses = []
for round_index in (1, 2):
    result = trainer.train_round(round_index, task, seed=round_index)
    losses.append(result.train_loss)
    task = result.tensors
torch.save({"losses": losses, "upload": task}, spec["out"])
"""


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from common.tiny_models import create_tiny_bert

    return create_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", num_labels=5, seed=0)


@pytest.mark.skipif(not GLIBC, reason="the threshold is glibc's")
def test_the_threshold_is_fixed_on_glibc_unless_the_environment_sets_it(monkeypatch):
    monkeypatch.delenv(memory.THRESHOLD_ENV, raising=False)
    assert memory.fix_mmap_threshold() is True
    monkeypatch.setenv(memory.THRESHOLD_ENV, "65536")
    assert memory.fix_mmap_threshold() is False          # the user's own setting wins


def test_releasing_free_memory_is_safe_anywhere():
    assert memory.release_free_memory() in (True, False)
    assert torch.ones(3).sum().item() == 3.0             # the allocator still works after a trim


@pytest.mark.parametrize("method", ["fedavg", "subspace_reg"])
def test_training_is_bit_for_bit_what_it_was_before_the_allocator_changes(tiny_path, tmp_path, method):
    """Two rounds of a fixed seed in a fresh process each: with the allocator as before, and as now."""
    overrides = {"model_name": tiny_path, "method": method, "max_local_steps": 3, "per_device_train_batch_size": 8,
                 "max_length": 32, "max_train_samples": 200, "max_eval_samples": 20}
    results = {}
    for tuned in (False, True):
        out = tmp_path / f"tuned_{tuned}.pt"
        spec = {"tuned": tuned, "overrides": overrides, "out": str(out)}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop(memory.THRESHOLD_ENV, None)
        subprocess.run([sys.executable, "-c", TRAIN_TWO_ROUNDS, json.dumps(spec)], cwd=ROOT, env=env, check=True,
                       timeout=300)
        results[tuned] = torch.load(out)
    before, after = results[False], results[True]
    assert before["losses"] == after["losses"]
    assert before["upload"].keys() == after["upload"].keys()
    for name, tensor in before["upload"].items():
        assert torch.equal(tensor, after["upload"][name]), name
