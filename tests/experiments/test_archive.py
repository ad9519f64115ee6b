"""A grid's completed runs are archived as their small result files, and an archive continues a grid."""

from __future__ import annotations

import json

from experiments.archive import ARCHIVED_FILES, archive, main
from experiments.grid import GridConfig
from experiments.run_grid import cell_state


def _run(directory, status="completed", rounds=2, config=None):
    directory.mkdir(parents=True)
    (directory / "summary.json").write_text(json.dumps({"status": status}))
    (directory / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "accuracy": 0.5}) + "\n"
                                                     for r in range(1, rounds + 1)))
    (directory / "config.yaml").write_text(config or "num_rounds: 2\n")
    (directory / "adapters").mkdir()
    (directory / "adapters" / "adapter_model.safetensors").write_bytes(b"x" * 1000)


def test_only_completed_runs_and_only_their_result_files_are_copied(tmp_path):
    _run(tmp_path / "runs" / "m" / "fedavg" / "seed1")
    _run(tmp_path / "runs" / "m" / "svd" / "seed1", status="stopped")
    copied, present = archive(tmp_path / "runs", tmp_path / "kept")
    assert [str(p) for p in copied] == ["m/fedavg/seed1"] and present == []
    kept = tmp_path / "kept" / "m" / "fedavg" / "seed1"
    assert sorted(p.name for p in kept.iterdir()) == sorted(n for n in ARCHIVED_FILES if (
        tmp_path / "runs" / "m" / "fedavg" / "seed1" / n).exists())
    assert not (tmp_path / "kept" / "m" / "svd").exists()
    assert archive(tmp_path / "runs", tmp_path / "kept") == ([], [copied[0]])     # a second pass copies nothing


def test_a_restored_archive_counts_as_finished_cells_of_the_grid(tmp_path, monkeypatch):
    grid = GridConfig.from_dict({"base_config": "configs/minilm_bbc.yaml", "methods": ["fedavg"], "seeds": [1],
                                 "models": [{"name": "m"}], "output_root": str(tmp_path / "out"),
                                 "overrides": {"num_rounds": 2}})
    cell = grid.cells()[0]
    config = "".join(f"{k}: {json.dumps(v)}\n" for k, v in cell.expected.items())
    _run(tmp_path / "kept" / "m" / "fedavg" / "seed1", config=config)
    assert not cell_state(cell).finished
    assert main([str(tmp_path / "kept"), str(tmp_path / "out")]) == 0
    assert cell_state(cell).finished


def test_a_missing_source_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "kept")]) == 2
    assert "is not a directory of runs" in capsys.readouterr().err
