"""bench/transport.py, bench/round_overhead.py, bench/scale.py and bench/summary.py end with sane JSON (tiny
sizes; no time is asserted: speed is what the benchmarks themselves report)."""

from __future__ import annotations

import json

import pytest

from bench import round_overhead, scale, summary, transport
from common.synthetic import payload_bytes

TINY = "encoder:1x32x64"


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_transport_times_both_sides_of_each_payload(capsys, tmp_path):
    out = tmp_path / "transport.json"
    assert transport.main(["--layout", TINY, "--rank", "2", "--multiples", "1,3", "--reps", "1", "--out", str(out)]) == 0
    result = _last_json(capsys)
    assert result == json.loads(out.read_text())
    assert result["bench"] == "transport" and result["target"] == 0.5
    assert [s["payload_bytes"] for s in result["sizes"]] == [payload_bytes(TINY, 2), 3 * payload_bytes(TINY, 2)]
    for size in result["sizes"]:
        for side in ("project", "raw"):
            assert size[side]["round_trip_mb_s"] > 0 and size[side]["download_mb_s"] > 0
        assert size["ratio"] == pytest.approx(size["project"]["round_trip_mb_s"] / size["raw"]["round_trip_mb_s"])
    assert result["met"] == (result["ratio_min"] >= 0.5)


@pytest.mark.integration
def test_round_overhead_runs_real_rounds(capsys, tmp_path):
    out = tmp_path / "round_overhead.json"
    assert round_overhead.main(["--layout", TINY, "--rank", "2", "--rounds", "2", "--methods", "fedavg",
                                "--echo-reps", "1", "--out", str(out)]) == 0
    result = _last_json(capsys)
    fedavg = result["methods"]["fedavg"]
    assert fedavg["rounds"] == 2 and fedavg["bytes_up_per_round"] == 3 * payload_bytes(TINY, 2)
    assert fedavg["round_wall_s"] > 0 and fedavg["echo_s"] > 0
    assert result["ratio_max"] == pytest.approx(fedavg["round_wall_s"] / fedavg["echo_s"])


@pytest.mark.integration
def test_scale_holds_light_clients_and_samples_a_tenth(capsys, tmp_path):
    out = tmp_path / "scale.json"
    assert scale.main(["--clients", "12", "--rounds", "2", "--idle", "1", "--layout", TINY, "--rank", "2",
                       "--out", str(out)]) == 0
    result = _last_json(capsys)
    (k12,) = result["results"]
    assert k12["k"] == 12 and k12["sampled"] == 2 and k12["participants"] == [2, 2]
    assert k12["rss_peak_mb"] >= k12["rss_idle_mb"] > 0 and k12["idle_cpu_percent"] >= 0
    assert result["max_clients_held"] == 12 and result["met"] is False       # 1,000 is the target


def test_summary_tables_every_result_and_names_the_missing(capsys, tmp_path):
    (tmp_path / "transport.json").write_text(json.dumps({
        "bench": "transport", "target": 0.5, "sizes": [{"payload_bytes": 14_221_312, "ratio": 0.6,
                                                        "project": {"round_trip_mb_s": 300.0},
                                                        "raw": {"round_trip_mb_s": 500.0}}]}) + "\n")
    (tmp_path / "distributed.log").write_text("chatter\n" + json.dumps({"bench": "distributed", "skipped": "no gloo"}))
    (tmp_path / "client_overhead.log").write_text(json.dumps({
        "bench": "client_overhead", "fedavg": {"ratio": 0.93, "target": 0.9, "meets_target": True},
        "subspace_reg": {"ratio": 0.84, "target": 0.85, "meets_target": False}}))
    (tmp_path / "client_memory.log").write_text(json.dumps({
        "bench": "client_memory", "mode": "full", "peak_rss_mb": 716.4, "idle_rss_mb": 529.5, "target_mb": 600.0,
        "peak_ok": False}))
    (tmp_path / "scale.json").write_text(json.dumps({
        "bench": "scale", "quick": True, "max_clients_held": 100, "target_clients": 1000, "met": False, "results": []}))
    assert summary.main(["--dir", str(tmp_path)]) == 1            # math, soak, ... have no result here
    table = capsys.readouterr().out
    assert "| transport (P3) 14.2 MB" in table and "300 vs 500 MB/s: 0.60" in table and "| met" in table
    assert "skipped: no gloo" in table
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:5]] for line in table.splitlines()}
    assert rows["client step vs bare PEFT (P7) fedavg"] == ["0.930", ">= 0.9", "met"]
    assert rows["client step vs bare PEFT (P7) subspace_reg"] == ["0.840", ">= 0.85", "NOT met"]
    assert rows["client peak RSS (default config)"] == ["716 MB (idle 530 MB)", "<= 600 MB", "NOT met"]
    # --quick stops at 100 clients: not a failure of the 1,000 target, which it never tried
    assert rows["scale (P5) clients held"] == ["100 (--quick: not tried at 1000)", ">= 1000", "n/a"]
    assert "round_overhead" in table and "no result" in table
    assert summary.main(["--dir", str(tmp_path), "--only", "transport,distributed"]) == 0


def test_summary_judges_the_math_targets_on_the_issue_s_measures():
    """P1 on the one-call regularizer ratio (the per-step pair shown beside it), P2 on aggregation at K = 10."""
    rows = summary._math({"regularizer_speedup": 109.7, "regularizer_step_speedup": 83.3,
                          "aggregation_k10": {"speedup": 224.1}})
    assert rows[0][0].startswith("math: regularizer") and "110x dense (83x per step)" in rows[0][1]
    assert rows[1][0] == "math: aggregation K=10 (P2)" and rows[1][1] == "224x dense"
    assert [row[3] for row in rows] == [summary._met(True), summary._met(False)]
