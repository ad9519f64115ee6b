"""A client with its own data (--data) declares its size at join and is weighted by exactly that."""

from __future__ import annotations

import json
import re

import pytest

from tests.integration.conftest import tiny_run_config
from tests.integration.harness import Federation

pytestmark = pytest.mark.integration

LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def test_a_client_with_its_own_data_is_bound_to_the_size_it_declared(tmp_path, tiny_model_dir):
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"text": f"a short {LABELS[i % 5]} story number {i}", "label": LABELS[i % 5]})
                           + "\n" for i in range(40)))
    config = tiny_run_config(tiny_model_dir, num_clients=2, num_rounds=2, client_fraction=1.0)
    with Federation(tmp_path / "fed", config) as federation:
        federation.start_coordinator()
        federation.wait_address()
        federation.start_client(0, "--partition", "0")
        federation.start_client(1, "--partition", "1", "--data", str(own))
        assert federation.finish() == 0, federation.log("coordinator.log")[-3000:]
        rows = int(re.search(r"training on own data .*: (\d+) rows", federation.log("client-1.log")).group(1))
        assert f"client client-1 joined (partition 1, {rows} examples of its own data" in federation.log("coordinator.log")
        partition_size = json.loads((federation.run_dir / "partition_stats.json").read_text())["sizes"][0]
        for line in federation.metrics():
            assert dict(zip(line["participants"], line["num_examples"])) == {"client-0": partition_size,
                                                                            "client-1": rows}
