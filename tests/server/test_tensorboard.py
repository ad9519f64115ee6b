"""TensorBoard events hold the values of metrics.jsonl, read back with TensorBoard's own reader."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from server.outputs import RunDirectory  # noqa: E402
from server.tensorboard import scalars_of  # noqa: E402


def _line(round_index: int) -> dict:
    return {"round": round_index, "method": "subspace_reg", "accuracy": 0.5 + round_index / 10,
            "loss": 1.0 / round_index, "basis_overlap": 0.9 + round_index / 100, "aggregation_error": None,
            "bytes_down": 4078140 * round_index, "bytes_up": 4078140, "round_seconds": 12.5,
            "aggregation_seconds": 0.25, "eval_seconds": 3.0, "mean_client_train_seconds": 7.0,
            "local_steps": {"client-1": 10, "client-4": 3}, "participants": ["client-1", "client-4"],
            "timestamp": 1796249609.0 + round_index, "attempt": 0, "new_metric": 2.0}


def _read(directory) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_every_scalar_of_every_line_is_an_event_at_its_round(tmp_path):
    run = RunDirectory(tmp_path / "run")
    lines = [_line(t) for t in (1, 2, 3)]
    for line in lines:
        run.append_metrics(line)
    scalars = _read(run.tensorboard)
    expected = {"eval/accuracy", "eval/loss", "alignment/basis_overlap", "bytes/bytes_down", "bytes/bytes_up",
                "seconds/round_seconds", "seconds/aggregation_seconds", "seconds/eval_seconds",
                "train/mean_client_train_seconds", "clients/local_steps/client-1", "clients/local_steps/client-4",
                "other/new_metric"}
    assert set(scalars) == expected                 # null (aggregation_error), lists and strings left out
    for line in run.read_metrics():                 # the very values metrics.jsonl holds, at step = round
        for tag, value in scalars_of(line).items():
            assert math.isclose(scalars[tag][line["round"]], value, rel_tol=1e-6), tag
    assert scalars["bytes/bytes_down"] == {1: 4078140.0, 2: 8156280.0, 3: 12234420.0}


def test_a_resume_purges_the_events_of_rounds_after_the_commit(tmp_path):
    run = RunDirectory(tmp_path / "run")
    for t in (1, 2, 3):
        run.append_metrics(_line(t))
    # Round 3 was written, then the coordinator died before committing it; the resume goes on after round 2.
    resumed = RunDirectory(tmp_path / "run")
    resumed.truncate_metrics(after_round=2)
    again = {**_line(3), "accuracy": 0.125}
    resumed.append_metrics(again)
    accuracy = _read(resumed.tensorboard)["eval/accuracy"]
    assert accuracy == {1: pytest.approx(0.6), 2: pytest.approx(0.7), 3: 0.125}
