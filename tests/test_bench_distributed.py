"""bench/distributed.py skips cleanly, with its one JSON line, where it cannot run."""

from __future__ import annotations

import json

import pytest

from bench.distributed import main


@pytest.mark.parametrize("ranks, why", [("3", "does not divide the global batch of 16"),
                                        ("1", "a distributed client has at least 2 ranks")])
def test_a_layout_it_cannot_run_is_skipped_with_a_reason(capsys, ranks, why):
    assert main(["--cpu", "--ranks", ranks]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "distributed" and why in last["skipped"]
