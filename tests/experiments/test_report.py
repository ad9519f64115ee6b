"""The report on synthetic run directories: known numbers in, known tables and valid PNGs out."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest

from experiments.report import METRICS, build_figures, collect_runs, group, main, write_report
from tests.experiments.runs import round_line, summary_of, write_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Per seed: accuracy per round (6 rounds), final loss, final cancellation ratio, final pairwise cosine.
FEDAVG = {
    42: ([0.25, 0.75, 0.5, 0.5, 0.5, 0.5], 1.0, 0.5, 0.25),
    43: ([0.25, 0.75, 0.75, 0.75, 0.75, 0.75], 2.0, 0.625, 0.5),
    44: ([0.25, 1.0, 1.0, 1.0, 1.0, 1.0], 3.0, 0.75, None),   # null: a NaN the coordinator wrote as null
}
SUBSPACE = {42: ([0.5] * 6, 0.5, 0.875, 0.75), 43: ([0.75] * 6, 0.5, 0.875, 0.75)}


def _lines(method: str, seed: int, accuracies, loss, cancellation, pairwise) -> list[dict]:
    lines = [round_line(r, method, acc, loss=2.0, round_seconds=float(seed - 40))
             for r, acc in enumerate(accuracies, start=1)]
    lines[-1].update(loss=loss, cancellation_ratio=cancellation, pairwise_client_cosine=pairwise,
                     basis_overlap=0.99999 if method == "subspace_reg" else 0.95)
    return lines


def _config(method: str, seed: int, rounds: int = 6) -> dict:
    return {"method": method, "seed": seed, "num_rounds": rounds, "model_name": "minilm"}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for method, table in (("fedavg", FEDAVG), ("subspace_reg", SUBSPACE)):
        for seed, row in table.items():
            lines = _lines(method, seed, *row)
            write_run(root / "minilm" / method / f"seed{seed}", _config(method, seed), lines, summary_of(lines))
    # What a grid in progress or a damaged directory leaves: each is skipped with its reason.
    lines = _lines("subspace_reg", 44, [0.5] * 3, 1.0, 0.5, 0.5)
    write_run(root / "minilm" / "subspace_reg" / "seed44", _config("subspace_reg", 44), lines)
    stopped = _lines("svd", 42, [0.5] * 6, 1.0, 0.5, 0.5)
    write_run(root / "minilm" / "svd" / "seed42", _config("svd", 42), stopped, summary_of(stopped, "stopped"))
    short = _lines("svd", 43, [0.5] * 3, 1.0, 0.5, 0.5)
    write_run(root / "minilm" / "svd" / "seed43", _config("svd", 43), short, summary_of(short))
    lacking = _lines("fedsvd", 42, [0.5] * 6, 1.0, 0.5, 0.5)
    summary = summary_of(lacking)
    del summary["final_loss"]
    write_run(root / "minilm" / "fedsvd" / "seed42", _config("fedsvd", 42), lacking, summary)
    (root / "minilm" / "fedsvd" / "seed43").mkdir(parents=True)
    (root / "minilm" / "fedsvd" / "seed43" / "summary.json").write_text("{not json")
    started = root / "minilm" / "fedsvd" / "seed44"   # a grid cell whose coordinator is still starting
    started.mkdir(parents=True)
    (started / "launcher.log").write_text("run directory ...\n")
    # Moved-aside cells are not runs of the grid any more.
    hidden = _lines("fedavg", 42, [0.0] * 6, 9.0, 0.0, 0.0)
    write_run(root / ".incomplete" / "minilm" / "fedavg" / "seed42-1", _config("fedavg", 42), hidden,
              summary_of(hidden))
    return root


@pytest.fixture(scope="module")
def report(runs_root, tmp_path_factory):
    return write_report(runs_root, tmp_path_factory.mktemp("report"))


def _csv_rows(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with open(path, newline="") as handle:
        return {(row["model"], row["method"], row["metric"]): row for row in csv.DictReader(handle)}


def test_summary_of_matches_what_the_coordinator_writes():
    from server.outputs import summarize

    lines = _lines("fedavg", 43, *FEDAVG[43])
    assert summary_of(lines) == {**summarize(lines), "status": "completed"}


def test_csv_has_the_exact_mean_and_sample_std_over_seeds(report):
    rows = _csv_rows(report.summary_csv)
    assert {method for _, method, _ in rows} == {"fedavg", "subspace_reg"}
    assert len(rows) == 2 * len(METRICS)

    def check(method, metric, n, mean, std, values):
        row = rows[("minilm", method, metric)]
        assert int(row["n"]) == n
        assert float(row["mean"]) == mean
        assert (row["std"] == "") if std is None else float(row["std"]) == std
        assert [float(v) for v in row["values"].split(";")] == values

    check("fedavg", "final_accuracy", 3, 0.75, 0.25, [0.5, 0.75, 1.0])
    check("fedavg", "final_loss", 3, 2.0, 1.0, [1.0, 2.0, 3.0])
    check("fedavg", "cancellation_ratio", 3, 0.625, 0.125, [0.5, 0.625, 0.75])
    check("fedavg", "pairwise_client_cosine", 2, 0.375, statistics.stdev([0.25, 0.5]), [0.25, 0.5])
    check("fedavg", "total_bytes_up", 3, 6e6, 0.0, [6e6, 6e6, 6e6])
    check("fedavg", "total_round_seconds", 3, 18.0, 6.0, [12.0, 18.0, 24.0])
    check("subspace_reg", "final_accuracy", 2, 0.625, statistics.stdev([0.5, 0.75]), [0.5, 0.75])
    check("subspace_reg", "basis_overlap", 2, 0.99999, 0.0, [0.99999, 0.99999])
    best = rows[("minilm", "fedavg", "best_accuracy")]
    assert float(best["mean"]) == pytest.approx(5 / 6, rel=1e-15)
    assert float(best["std"]) == pytest.approx(math.sqrt(1 / 48), rel=1e-15)
    last5 = rows[("minilm", "fedavg", "mean_last5_accuracy")]
    assert [float(v) for v in last5["values"].split(";")] == pytest.approx([0.55, 0.75, 1.0])
    assert best["seeds"] == "42;43;44" and rows[("minilm", "fedavg", "pairwise_client_cosine")]["seeds"] == "42;43"


def test_markdown_has_the_studys_tables_with_mean_std_and_n(report):
    text = report.summary_md.read_text()
    assert "## Model: minilm" in text
    assert "| Method | n | Best acc. | Mean of last 5 | Final acc. | Final loss |" in text
    assert "| FedAvg | 3 | 0.8333 ± 0.1443 | 0.7667 ± 0.2255 | 0.7500 ± 0.2500 | 2.0000 ± 1.0000 |" in text
    assert "| Subspace-Reg | 2 | 0.6250 ± 0.1768 | 0.6250 ± 0.1768 | 0.6250 ± 0.1768 | 0.5000 ± 0.0000 |" in text
    assert ("| Method | n | Cancellation ratio | Client-global cos | Pairwise cos | Basis overlap | Basis overlap² "
            "| Update-subspace overlap | Aggregation error |") in text
    assert ("| FedAvg | 3 | 0.62500 ± 0.12500 | 0.50000 ± 0.00000 | 0.37500 ± 0.17678 (n=2) | 0.95000 ± 0.00000 "
            "| 0.50000 ± 0.00000 | 0.50000 ± 0.00000 | 0.50000 ± 0.00000 |") in text
    assert "| FedAvg | 0.5000 (0.7500) | 0.7500 (0.7500) | 1.0000 (1.0000) |" in text
    assert "| Subspace-Reg | 0.5000 (0.5000) | 0.7500 (0.7500) | — |" in text
    assert "| Method | n | Bytes up (MB) | Bytes down (MB) | Wall time (s) |" in text
    assert "| FedAvg | 3 | 6.00 ± 0.00 | 12.00 ± 0.00 | 18.0 ± 6.0 |" in text
    # Methods in the study's order, whatever order the directories sort in.
    assert text.index("| FedAvg | 3 | 0.8333") < text.index("| Subspace-Reg | 2 | 0.6250")


def test_unfinished_and_damaged_runs_are_listed_not_reported(report):
    text = report.summary_md.read_text()
    warnings = [line for line in text.splitlines() if line.startswith("- WARNING:")]
    assert len(warnings) == 6 and len(report.skipped) == 6 and report.num_runs == 5
    expected = {
        "minilm/subspace_reg/seed44": "no summary.json",
        "minilm/svd/seed42": "status 'stopped'",
        "minilm/svd/seed43": "metrics.jsonl has 3 of 6 rounds",
        "minilm/fedsvd/seed42": "summary.json lacks final_loss",
        "minilm/fedsvd/seed43": "summary.json is not valid JSON",
        "minilm/fedsvd/seed44": "no summary.json",
    }
    for path, reason in expected.items():
        assert any(f"`{path}`" in line and reason in line for line in warnings), (path, warnings)
    assert ".incomplete" not in text


def test_plots_are_valid_pngs(report):
    import matplotlib.image

    names = sorted(p.name for p in report.plots)
    assert names == ["minilm_accuracy.png", "minilm_accuracy_vs_mb.png", "minilm_alignment.png", "minilm_bytes.png",
                     "minilm_final_accuracy_per_seed.png"]
    for path in report.plots:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"]({path.name})" in report.summary_md.read_text()


def test_runs_outside_the_grid_layout_are_grouped_by_model_name(tmp_path):
    for name, seed in (("run-a", 1), ("run-b", 2)):
        lines = [round_line(1, "svd", 0.5 + seed / 8)]
        write_run(tmp_path / "runs" / name, {"method": "svd", "seed": seed, "num_rounds": 1,
                                            "model_name": "/models/roberta-large"}, lines, summary_of(lines))
    report = write_report(tmp_path / "runs", tmp_path / "out", plots=False)
    rows = _csv_rows(report.summary_csv)
    assert float(rows[("roberta-large", "svd", "final_accuracy")]["mean"]) == 0.5 + 3 / 16
    assert report.plots == []


def test_cli_writes_the_report_and_fails_on_an_empty_root(tmp_path, capsys):
    lines = [round_line(1, "fedavg", 0.5)]
    write_run(tmp_path / "runs" / "m" / "fedavg" / "seed1", {"method": "fedavg", "seed": 1, "num_rounds": 1},
              lines, summary_of(lines))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    assert (tmp_path / "out" / "summary.md").exists() and (tmp_path / "out" / "summary.csv").exists()
    # n = 1: no standard deviation, only the mean.
    assert "| FedAvg | 1 | 0.5000 | 0.5000 | 0.5000 | 1.0000 |" in (tmp_path / "out" / "summary.md").read_text()
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--no-plots"]) == 1
    assert "no completed run" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


# --------------------------------------------------------------------------- convergence and bytes
# 20 rounds per run, so the early mean covers rounds 1..10 only and a round axis would get 2.5-ticks by default.
# Per method and seed: accuracy per round and (bytes up, bytes down, residual bytes down) of every round.
CONVERGENCE_RUNS = {
    "fedavg": {
        1: ([0.5, 0.6, 0.7, 0.8] + [0.9] * 6 + [0.95] * 10, (1_000_000, 2_000_000, 0)),
        2: ([0.4, 0.5, 0.6, 0.7, 0.8] + [0.9] * 15, (1_000_000, 2_000_000, 0)),
    },
    "svd": {
        1: ([0.5, 0.8] + [0.9] * 18, (1_000_000, 2_000_000, 0)),
        2: ([0.5] * 20, (1_000_000, 2_000_000, 0)),
    },
    # Not a registered method (a prototype's runs): labelled by its name. It sends base-weight residuals.
    "my_method": {1: ([0.5] * 20, (500_000, 1_500_000, 500_000))},
}


@pytest.fixture(scope="module")
def convergence_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convergence_runs")
    for method, by_seed in CONVERGENCE_RUNS.items():
        for seed, (accuracies, (up, down, residual)) in by_seed.items():
            lines = [{**round_line(r, method, acc, bytes_up=up, bytes_down=down), "residual_bytes_down": residual}
                     for r, acc in enumerate(accuracies, start=1)]
            write_run(root / "conv" / method / f"seed{seed}", {"method": method, "seed": seed, "num_rounds": 20},
                      lines, summary_of(lines))
    return root


@pytest.fixture(scope="module")
def convergence_report(convergence_root, tmp_path_factory):
    return write_report(convergence_root, tmp_path_factory.mktemp("convergence_report"))


def test_convergence_table_by_hand(convergence_report):
    text = convergence_report.summary_md.read_text()
    assert "### Convergence" in text
    assert "| Method | n | Mean acc. rounds 1–10 | First round acc. ≥ 0.9 | MB sent by then | MB sent / round |" in text
    # fedavg: rounds 1..10 average 0.8 (seed 1) and 0.75 (seed 2); 0.9 first at rounds 5 and 6, after
    # 5 x 3 MB and 6 x 3 MB. std of two values a, b is |a - b| / sqrt(2).
    assert "| FedAvg | 2 | 0.7750 ± 0.0354 | 5.5 ± 0.7 | 16.50 ± 2.12 | 3.00 ± 0.00 |" in text
    # svd: 0.85 and 0.5 over rounds 1..10; only seed 1 reaches 0.9 (round 3, 9 MB).
    assert "| SVD | 2 | 0.6750 ± 0.2475 | 3.0 (1 of 2 reached) | 9.00 (1 of 2 reached) | 3.00 ± 0.00 |" in text
    assert "| my_method | 1 | 0.5000 | not reached | not reached | 2.00 |" in text


def test_convergence_values_in_the_csv(convergence_report):
    rows = _csv_rows(convergence_report.summary_csv)
    fedavg = {metric: rows[("conv", "fedavg", metric)] for metric in METRICS}
    assert [float(v) for v in fedavg["mean_accuracy_rounds_1_10"]["values"].split(";")] == pytest.approx([0.8, 0.75])
    assert float(fedavg["first_round_at_target"]["mean"]) == 5.5
    assert [float(v) for v in fedavg["bytes_at_target"]["values"].split(";")] == [15e6, 18e6]
    svd_first = rows[("conv", "svd", "first_round_at_target")]
    assert (svd_first["n"], svd_first["seeds"], svd_first["values"]) == ("1", "1", "3.0")
    assert rows[("conv", "my_method", "first_round_at_target")]["n"] == "0"
    assert float(rows[("conv", "my_method", "bytes_down_per_round")]["mean"]) == 1.5e6


def test_cost_table_has_bytes_per_round_and_names_the_residual(convergence_report, report):
    text = convergence_report.summary_md.read_text()
    assert ("| Method | n | Bytes up (MB) | Bytes down (MB) | Wall time (s) | Bytes up / round (MB) "
            "| Bytes down / round (MB) |") in text
    assert "| FedAvg | 2 | 20.00 ± 0.00 | 40.00 ± 0.00 | 200.0 ± 0.0 | 1.00 ± 0.00 | 2.00 ± 0.00 |" in text
    assert "| my_method | 1 | 10.00 | 30.00 | 200.0 | 0.50 | 1.50 |" in text
    assert ("Bytes down include the base-weight residual increments (`residual_bytes_down`) of my_method "
            "(0.50 MB per round on average)") in text
    # Runs without residual increments (here: none wrote the key) get no such line.
    assert "residual" not in report.summary_md.read_text()


def test_a_target_accuracy_can_be_chosen(convergence_root, tmp_path):
    text = write_report(convergence_root, tmp_path / "out", plots=False, target_accuracy=0.5).summary_md.read_text()
    assert "First round acc. ≥ 0.5" in text
    # fedavg seed 2 starts at 0.4: rounds 1 and 2; every other run is at 0.5 in round 1.
    assert "| FedAvg | 2 | 0.7750 ± 0.0354 | 1.5 ± 0.7 | 4.50 ± 2.12 | 3.00 ± 0.00 |" in text
    assert "| my_method | 1 | 0.5000 | 1.0 | 2.00 | 2.00 |" in text


def test_bytes_and_accuracy_vs_mb_plots_are_non_empty_pngs(convergence_report):
    import matplotlib.image

    by_name = {path.name: path for path in convergence_report.plots}
    for name in ("conv_bytes.png", "conv_accuracy_vs_mb.png"):
        data = by_name[name].read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
        image = matplotlib.image.imread(by_name[name])
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01   # something is drawn, not a blank canvas
        assert f"]({name})" in convergence_report.summary_md.read_text()


def test_round_axes_have_whole_number_ticks(convergence_root):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs, _ = collect_runs(convergence_root)
    figures = build_figures("conv", group(runs)["conv"])
    assert list(figures) == ["accuracy", "alignment", "final_accuracy_per_seed", "bytes", "accuracy_vs_mb"]
    round_axes = [ax for fig in figures.values() for ax in fig.axes if ax.get_xlabel() == "round"]
    # accuracy 1, alignment 4, bytes 2 (the per-seed and accuracy-vs-MB plots have no round axis).
    assert len(round_axes) == 7
    for ax in round_axes:
        locator = ax.xaxis.get_major_locator()
        assert isinstance(locator, MaxNLocator) and locator._integer
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks   # 20 rounds: no 2.5, 7.5
    assert figures["accuracy_vs_mb"].axes[0].get_xlabel() == "cumulative MB sent (up + down)"
    for fig in figures.values():
        plt.close(fig)


def test_cli_rejects_a_target_accuracy_outside_0_1(convergence_root, tmp_path, capsys):
    assert main([str(convergence_root), "--out", str(tmp_path / "out"), "--target-accuracy", "90"]) == 2
    assert "--target-accuracy 90.0: expected an accuracy in (0, 1]" in capsys.readouterr().err
