"""The grid runner with a fake launcher: finished cells are skipped, an interrupted grid resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from experiments.grid import GridConfig
from experiments.run_grid import cell_state, main, parse_only, run_grid

ROOT = Path(__file__).resolve().parents[2]


def _grid(tmp_path: Path, **changes) -> GridConfig:
    values = {"base_config": str(ROOT / "configs" / "minilm_bbc.yaml"), "methods": ["fedavg", "svd"],
              "seeds": [42, 43], "models": [{"name": "minilm"}], "output_root": str(tmp_path / "runs"),
              "overrides": {"num_rounds": 3}}
    values.update(changes)
    return GridConfig.from_dict(values)


def _launcher(tmp_path: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "tests.experiments.fake_launcher", "--calls", str(tmp_path / "calls.txt"), *options]


def _calls(tmp_path: Path) -> list[str]:
    """The cells launched so far, as model/method/seedN, in order."""
    path = tmp_path / "calls.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return ["/".join(Path(line.split()[0]).parts[-3:]) for line in lines]


def test_an_interrupted_grid_reruns_only_the_unfinished_cells(tmp_path):
    grid = _grid(tmp_path)
    messages: list[str] = []
    first = run_grid(grid, _launcher(tmp_path, "--fail-on", "svd/seed42"), say=messages.append)
    # Cell 3 of 4 fails: the grid stops there, cell 4 is never started.
    assert first.ran == ["minilm/fedavg/seed42", "minilm/fedavg/seed43"] and first.failed == ["minilm/svd/seed42"]
    assert _calls(tmp_path) == ["minilm/fedavg/seed42", "minilm/fedavg/seed43", "minilm/svd/seed42"]
    assert any("[cell 3/4] minilm/svd/seed42: FAILED (launcher exited 1)" in m for m in messages)
    assert any("[cell 2/4] minilm/fedavg/seed43: running" in m and "ETA" in m for m in messages)
    failed_dir = tmp_path / "runs" / "minilm" / "svd" / "seed42"
    assert not cell_state(grid.cells()[2]).finished and (failed_dir / "launcher.log").exists()
    finished_metrics = (tmp_path / "runs" / "minilm" / "fedavg" / "seed42" / "metrics.jsonl").stat().st_mtime_ns

    messages.clear()
    second = run_grid(grid, _launcher(tmp_path), say=messages.append)
    assert second.ok and second.finished == ["minilm/fedavg/seed42", "minilm/fedavg/seed43"]
    assert second.ran == ["minilm/svd/seed42", "minilm/svd/seed43"]
    assert _calls(tmp_path)[3:] == ["minilm/svd/seed42", "minilm/svd/seed43"]
    assert messages[0].endswith(f"2 finished, 2 to run; output {tmp_path / 'runs'}")
    assert "[cell 1/4] minilm/fedavg/seed42: finished, skipped" in messages
    # The half-finished directory was kept aside (its logs tell why it failed), out of the report's way.
    moved = list((tmp_path / "runs" / ".incomplete" / "minilm" / "svd").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("seed42-")
    assert len((moved[0] / "metrics.jsonl").read_text().splitlines()) == 1
    assert all(cell_state(cell).finished for cell in grid.cells())
    assert (tmp_path / "runs" / "minilm" / "fedavg" / "seed42" / "metrics.jsonl").stat().st_mtime_ns == \
        finished_metrics

    third = run_grid(grid, _launcher(tmp_path), say=messages.append)
    assert third.ran == [] and len(third.finished) == 4 and len(_calls(tmp_path)) == 5


def test_keep_going_runs_the_cells_after_a_failure(tmp_path):
    result = run_grid(_grid(tmp_path), _launcher(tmp_path, "--fail-on", "fedavg/seed43"), keep_going=True,
                      say=lambda _: None)
    assert result.failed == ["minilm/fedavg/seed43"] and len(result.ran) == 3 and not result.ok


def test_a_launcher_that_exits_0_without_a_completed_run_is_a_failure(tmp_path):
    result = run_grid(_grid(tmp_path, seeds=[42], methods=["svd"]), _launcher(tmp_path, "--no-summary"),
                      say=lambda _: None)
    assert result.failed == ["minilm/svd/seed42"]


def test_a_cell_run_with_other_settings_is_not_taken_as_finished(tmp_path):
    run_grid(_grid(tmp_path, seeds=[42], methods=["svd"]), _launcher(tmp_path), say=lambda _: None)
    changed = _grid(tmp_path, seeds=[42], methods=["svd"], overrides={"num_rounds": 3, "learning_rate": 0.01})
    state = cell_state(changed.cells()[0])
    assert not state.finished and "learning_rate=0.001" in state.reason and "wants 0.01" in state.reason
    more_rounds = _grid(tmp_path, seeds=[42], methods=["svd"], overrides={"num_rounds": 4})
    assert cell_state(more_rounds.cells()[0]).reason == "metrics.jsonl has 3 of 4 rounds"


def test_the_launcher_gets_the_cells_config_run_dir_and_overrides(tmp_path):
    grid = _grid(tmp_path, seeds=[43], methods=["fedsvd"], launcher_args=["--tiny-model"],
                 overrides={"num_rounds": 2, "target_modules": ["query", "value"], "max_train_samples": None})
    run_grid(grid, _launcher(tmp_path), extra_launcher_args=["--devices", "cuda:0,cuda:1"], say=lambda _: None)
    argv = (tmp_path / "calls.txt").read_text().split()
    run_dir = tmp_path / "runs" / "minilm" / "fedsvd" / "seed43"
    assert argv[argv.index("--run-dir") + 1] == str(run_dir)
    assert argv[argv.index("--timeout") + 1] == "7200" and "--tiny-model" in argv
    assert argv[argv.index("--devices") + 1] == "cuda:0,cuda:1"
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["target_modules"] == ["query", "value"] and stored["max_train_samples"] is None
    assert (stored["method"], stored["seed"], stored["num_rounds"]) == ("fedsvd", 43, 2)


def test_only_selects_cells_and_dry_run_starts_nothing(tmp_path):
    grid = _grid(tmp_path)
    messages: list[str] = []
    result = run_grid(grid, _launcher(tmp_path), only=parse_only(["method=svd", "seed=43"], grid), dry_run=True,
                      say=messages.append)
    assert result.ran == [] and not (tmp_path / "calls.txt").exists() and not (tmp_path / "runs").exists()
    assert messages[0].startswith("grid: 1 models x 2 methods x 2 seeds, 1 of 4 cells selected by --only")
    assert "[cell 1/1] minilm/svd/seed43: would run" in messages[1] and "--run-dir" in messages[1]
    for bad, message in (("methd=svd", "did you mean 'method'"), ("seed=7", "7 not in the grid's seeds"),
                         ("method", "expected key=value")):
        with pytest.raises(ValueError, match=message):
            parse_only([bad], grid)


def test_main_runs_the_grid_then_writes_the_report(tmp_path, capsys):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base_config": str(ROOT / "configs" / "minilm_bbc.yaml"), "methods": ["fedavg", "subspace_reg"],
        "seeds": [42, 43], "models": [{"name": "minilm"}], "output_root": str(tmp_path / "runs"),
        "overrides": {"num_rounds": 6}, "report_dir": str(tmp_path / "report")}))
    assert main(["--grid", str(grid_file)], launcher=_launcher(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'report' / 'summary.md'} (4 runs, 0 skipped)" in out
    text = (tmp_path / "report" / "summary.md").read_text()
    assert "| FedAvg | 2 |" in text and "| Subspace-Reg | 2 |" in text
    assert main(["--grid", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    summary = json.loads((tmp_path / "runs" / "minilm" / "fedavg" / "seed42" / "summary.json").read_text())
    assert summary["status"] == "completed"


def _scenario_grid(tmp_path: Path) -> GridConfig:
    return _grid(tmp_path, methods=["fedavg", "svd", "subspace_reg"], seeds=[42],
                 models=[{"name": "minilm"}, {"name": "minilm-hetrank", "methods": ["svd"],
                                              "overrides": {"num_clients": 10,
                                                            "client_ranks": [8, 2, 4, 8, 2, 4, 8, 2, 4, 8]}}])


def test_only_and_dry_run_follow_each_entrys_methods(tmp_path):
    grid = _scenario_grid(tmp_path)
    messages: list[str] = []
    run_grid(grid, _launcher(tmp_path), dry_run=True, say=messages.append)
    assert messages[0].startswith("grid: 2 models x methods (minilm: 3, minilm-hetrank: 1) x 1 seeds, 4 cells:")
    assert [m.split(": ")[0] for m in messages[1:]] == [
        "[cell 1/4] minilm/fedavg/seed42", "[cell 2/4] minilm/svd/seed42", "[cell 3/4] minilm/subspace_reg/seed42",
        "[cell 4/4] minilm-hetrank/svd/seed42"]
    assert "client_ranks=[8, 2, 4, 8, 2, 4, 8, 2, 4, 8]" in messages[4]

    messages.clear()
    run_grid(grid, _launcher(tmp_path), only=parse_only(["method=svd"], grid), dry_run=True, say=messages.append)
    assert messages[0].startswith("grid: 2 models x methods (minilm: 3, minilm-hetrank: 1) x 1 seeds, "
                                  "2 of 4 cells selected by --only")
    assert "minilm/svd/seed42" in messages[1] and "minilm-hetrank/svd/seed42" in messages[2]
    assert not (tmp_path / "calls.txt").exists()

    result = run_grid(grid, _launcher(tmp_path), only=parse_only(["model=minilm-hetrank"], grid),
                      say=lambda _: None)
    assert result.ran == ["minilm-hetrank/svd/seed42"] and _calls(tmp_path) == ["minilm-hetrank/svd/seed42"]
    stored = yaml.safe_load((tmp_path / "runs" / "minilm-hetrank" / "svd" / "seed42" / "config.yaml").read_text())
    assert stored["client_ranks"] == [8, 2, 4, 8, 2, 4, 8, 2, 4, 8]


def test_main_refuses_an_only_that_selects_no_cell(tmp_path, capsys):
    grid_file = tmp_path / "grid.yaml"
    grid = _scenario_grid(tmp_path)
    grid_file.write_text(yaml.safe_dump({
        "base_config": grid.base_config, "methods": grid.methods, "seeds": grid.seeds,
        "output_root": grid.output_root, "overrides": grid.overrides,
        "models": [{"name": m.name, "methods": m.methods, "overrides": m.overrides} for m in grid.models]}))
    code = main(["--grid", str(grid_file), "--only", "model=minilm-hetrank", "--only", "method=fedavg", "--dry-run"],
                launcher=_launcher(tmp_path))
    assert code == 2 and not (tmp_path / "calls.txt").exists()
    err = capsys.readouterr().err
    assert "--only selects no cell" in err and "minilm-hetrank: svd" in err
    assert "minilm: fedavg, svd, subspace_reg" in err
