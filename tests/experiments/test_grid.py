"""Grid files: the shipped ones resolve to the intended cells; a bad one fails with the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from experiments.grid import GridConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = str(ROOT / "configs" / "minilm_bbc.yaml")


def _grid(**changes) -> dict:
    grid = {"base_config": BASE, "methods": ["fedavg", "subspace_reg"], "seeds": [42, 43],
            "models": [{"name": "minilm"}], "output_root": "runs/x"}
    grid.update(changes)
    return grid


def test_cpu_grid_is_4_methods_x_3_seeds_of_the_minilm_federation():
    grid = GridConfig.load(ROOT / "configs" / "grid_cpu.yaml")
    cells = grid.cells()
    assert len(cells) == 12 and grid.output_root == "runs/cpu_grid"
    assert {c.method for c in cells} == {"fedavg", "svd", "fedsvd", "subspace_reg"}
    assert {c.seed for c in cells} == {42, 43, 44}
    first = cells[0]
    assert first.run_dir == Path("runs/cpu_grid/minilm/fedavg/seed42") and first.num_rounds == 20
    assert {k: first.expected[k] for k in ("num_clients", "dirichlet_alpha", "client_fraction", "model_name")} == \
        {"num_clients": 10, "dirichlet_alpha": 0.3, "client_fraction": 0.3, "model_name": "minilm"}
    assert str(first.config_path) == "configs/minilm_bbc.yaml"


def test_reference_grid_runs_both_study_models_with_their_own_configs():
    grid = GridConfig.load(ROOT / "configs" / "grid_reference.yaml")
    cells = grid.cells()
    assert len(cells) == 24
    by_model = {c.model.name: str(c.config_path) for c in cells}
    assert by_model == {"roberta-large": "configs/roberta_large_hellaswag.yaml",
                        "smollm-360m": "configs/smollm_360m_hellaswag.yaml"}
    assert {c.num_rounds for c in cells} == {20}


def test_cells_combine_grid_model_and_cell_overrides_in_that_order():
    grid = GridConfig.from_dict(_grid(overrides={"num_rounds": 3, "learning_rate": 0.01},
                                      models=[{"name": "tiny", "overrides": {"num_rounds": 2},
                                               "launcher_args": ["--tiny-model"]}],
                                      launcher_args=["--devices", "cpu"]))
    cell = grid.cells()[1]
    assert cell.overrides == {"num_rounds": 2, "learning_rate": 0.01, "method": "fedavg", "seed": 43}
    assert cell.num_rounds == 2 and cell.launcher_args == ("--devices", "cpu", "--tiny-model")
    assert "model_name" not in cell.expected   # the launcher puts the tiny model's path there
    assert grid.report_path == Path("runs/x/report")


@pytest.mark.parametrize("changes, message", [
    ({"method": ["fedavg"]}, "unknown key 'method'; did you mean 'methods'?"),
    ({"methods": ["fedavgg"]}, "unknown method 'fedavgg'; did you mean 'fedavg'?"),
    ({"methods": []}, r"methods=\[\]: expected a non-empty list"),
    ({"seeds": [42, "43"]}, "seeds: '43' is not an integer"),
    ({"seeds": [42, 42]}, "seeds: 42 listed more than once"),
    ({"models": [{"name": "a/b"}]}, "name='a/b' is not a usable directory name"),
    ({"models": [{"name": "m", "overides": {}}]}, r"models\[0\]: unknown key 'overides'; did you mean 'overrides'?"),
    ({"models": [{"config": BASE}]}, r"models\[0\]: missing 'name'"),
    ({"models": [{"name": "m"}, {"name": "m"}]}, "models: m listed more than once"),
    ({"overrides": {"num_round": 5}}, r"models\[minilm\]: unknown config key 'num_round'; did you mean 'num_rounds'"),
    ({"overrides": {"client_fraction": 0.0}}, "client_fraction=0.0"),
    ({"overrides": {"method": "svd"}}, "overrides sets 'method', which the grid sets per cell"),
    ({"models": [{"name": "m", "overrides": {"seed": 1}}]}, "sets 'seed', which the grid sets per cell"),
    ({"models": [{"name": "m", "config": "configs/nope.yaml"}]}, "config file 'configs/nope.yaml' does not exist"),
    ({"launcher_args": "--tiny-model"}, "launcher_args='--tiny-model': expected a list of strings"),
    ({"cell_timeout_s": 0}, "cell_timeout_s=0: expected a positive number"),
])
def test_a_bad_grid_names_the_key_and_the_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        GridConfig.from_dict(_grid(**changes))


def test_missing_required_keys_and_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="missing seeds, models"):
        GridConfig.from_dict({"base_config": BASE, "methods": ["svd"]})
    with pytest.raises(ValueError, match="does not exist"):
        GridConfig.load(tmp_path / "nope.yaml")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(_grid(outptu_root="x")))
    with pytest.raises(ValueError, match=f"{path}: unknown key 'outptu_root'; did you mean 'output_root'?"):
        GridConfig.load(path)
