"""A short soak (bench/soak.py, same code path as `make bench`): rounds of the tiny model with clients
killed (kill -9) and restarted at random; the run completes, every round's participants are distinct and
sampled, every killed client comes back, and the coordinator's descriptors stay flat."""

from __future__ import annotations

import pytest

from bench.soak import QUICK_LOCAL_STEPS, run_soak

pytestmark = pytest.mark.integration


def test_short_soak_with_clients_killed_and_restarted_at_random(tmp_path, tiny_model_dir):
    result = run_soak(rounds=30, clients=3, kills=2, seed=0, workdir=tmp_path, model_dir=tiny_model_dir,
                      max_local_steps=QUICK_LOCAL_STEPS, timeout_s=420)
    figures = result.figures()
    context = f"{figures}\n" + (tmp_path / "logs" / "coordinator.log").read_text(errors="replace")[-3000:]
    assert result.error is None, result.error + "\n" + context

    # The run completed every round, in order.
    assert result.coordinator_exit == 0, context
    assert result.summary["status"] == "completed" and result.summary["rounds_completed"] == 30, context
    assert [m["round"] for m in result.metrics] == list(range(1, 31))

    # Every round: participants distinct, not empty, within that round's sample.
    assert result.participant_problems() == [], context
    for line in result.metrics:
        assert line["participants"] and len(set(line["participants"])) == len(line["participants"])
        assert set(line["participants"]) <= set(line["sampled"])

    # Both kills happened; each killed client came back (took part in a round opened after its restart),
    # and every client process (the restarted ones included) ended cleanly.
    assert len(result.kills) == 2 and result.restarts == 2 and result.kills_skipped == 0, context
    for kill in result.kills:
        assert kill.back_round is not None, f"{kill.name} killed after round {kill.at_round} never took part again"
        assert kill.back_round >= kill.after_round + 2
        assert kill.name in result.metrics[kill.back_round - 1]["participants"]
    assert result.client_exits == {"client-0": 0, "client-1": 0, "client-2": 0}, context

    # Descriptors: over the last rounds no more than at warm-up (round 10) plus a small constant
    # (one socket per client that was down at warm-up, plus a few).
    warmup = result.warmup
    assert warmup is not None and warmup.round == 10, context
    peak = result.peak("fds")
    assert peak is not None and peak <= warmup.fds + warmup.clients_down + 3, context
    assert result.last_sample.fds <= warmup.fds + warmup.clients_down + 3, context
