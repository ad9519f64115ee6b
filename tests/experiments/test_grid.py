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


def test_cpu_grid_is_7_methods_x_3_seeds_plus_the_heterogeneous_rank_and_bf16_wire_scenarios():
    grid = GridConfig.load(ROOT / "configs" / "grid_cpu.yaml")
    cells = grid.cells()
    assert len(cells) == 7 * 3 + 3 * 3 + 1 * 3 and grid.output_root == "runs/cpu_grid"
    minilm = [c for c in cells if c.model.name == "minilm"]
    hetrank = [c for c in cells if c.model.name == "minilm-hetrank"]
    assert {c.method for c in minilm} == {"fedavg", "svd", "fedsvd", "subspace_reg", "ffa_lora", "rolora",
                                          "fedex_lora"}
    assert {c.method for c in hetrank} == {"fedavg", "svd", "subspace_reg"}
    assert {c.seed for c in cells} == {42, 43, 44}
    first = cells[0]
    assert first.run_dir == Path("runs/cpu_grid/minilm/fedavg/seed42") and first.num_rounds == 20
    assert {k: first.expected[k] for k in ("num_clients", "dirichlet_alpha", "client_fraction", "model_name")} == \
        {"num_clients": 10, "dirichlet_alpha": 0.3, "client_fraction": 0.3, "model_name": "minilm"}
    assert str(first.config_path) == "configs/minilm_bbc.yaml"
    ranks = hetrank[0].expected["client_ranks"]
    assert ranks == [8, 2, 4, 8, 2, 4, 8, 2, 4, 8] and len(ranks) == hetrank[0].expected["num_clients"]
    assert set(ranks) == {2, 4, 8} and hetrank[0].expected.get("lora_rank", 8) == 8
    assert "client_ranks" not in first.expected
    assert first.expected["sampling_seeds"] == "independent" and first.expected["wire_dtype"] == "float32"
    bf16 = [c for c in cells if c.model.name == "minilm-bf16-wire"]
    assert [(c.method, c.seed) for c in bf16] == [("subspace_reg", s) for s in (42, 43, 44)]
    assert bf16[0].expected["wire_dtype"] == "bfloat16"


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


# --------------------------------------------------------------------------- per-entry methods


def _hetrank_grid(methods=("fedavg", "svd", "fedsvd", "subspace_reg"), entry_methods=("fedavg", "subspace_reg")):
    ranks = [8, 2, 4, 8, 2, 4, 8, 2, 4, 8]
    return _grid(methods=list(methods), seeds=[42, 43],
                 models=[{"name": "minilm"},
                         {"name": "minilm-hetrank", "methods": list(entry_methods),
                          "overrides": {"num_clients": 10, "client_ranks": ranks}}])


def test_an_entry_runs_only_its_own_methods_in_the_grids_order():
    grid = GridConfig.from_dict(_hetrank_grid(entry_methods=("subspace_reg", "fedavg")))
    cells = grid.cells()
    assert len(cells) == 4 * 2 + 2 * 2
    hetrank = [c for c in cells if c.model.name == "minilm-hetrank"]
    # The grid's list orders the cells (and the report), whatever order the entry lists them in.
    assert [(c.method, c.seed) for c in hetrank] == [("fedavg", 42), ("fedavg", 43),
                                                     ("subspace_reg", 42), ("subspace_reg", 43)]
    assert hetrank[0].run_dir == Path("runs/x/minilm-hetrank/fedavg/seed42")
    assert hetrank[0].expected["client_ranks"] == [8, 2, 4, 8, 2, 4, 8, 2, 4, 8]
    assert grid.methods_of(grid.models[0]) == ["fedavg", "svd", "fedsvd", "subspace_reg"]
    assert grid.describe() == "2 models x methods (minilm: 4, minilm-hetrank: 2) x 2 seeds"


def test_entries_without_methods_keep_the_full_product():
    grid = GridConfig.from_dict(_grid(models=[{"name": "a"}, {"name": "b", "methods": ["fedavg", "subspace_reg"]}]))
    assert len(grid.cells()) == 2 * 2 * 2
    assert grid.describe() == "2 models x 2 methods x 2 seeds"


@pytest.mark.parametrize("entry_methods, message", [
    (["fedavgg"], r"models\[minilm-hetrank\]\.methods: unknown method\(s\) 'fedavgg'; use one of .*fedavg"),
    (["fedavg", "svd"], r"models\[minilm-hetrank\]\.methods: 'svd' not in the grid's methods "
                        r"\(fedavg, subspace_reg\); add them to the grid's methods or drop them here"),
    ([], r"models\[minilm-hetrank\]\.methods=\[\]: expected a non-empty list of method names"),
    ("fedavg", r"methods='fedavg': expected a non-empty list"),
    (["fedavg", "fedavg"], r"models\[minilm-hetrank\]\.methods: fedavg listed more than once"),
])
def test_a_bad_entry_method_list_names_the_methods_and_the_fix(entry_methods, message):
    values = _hetrank_grid(methods=("fedavg", "subspace_reg"))
    values["models"][1]["methods"] = entry_methods
    with pytest.raises(ValueError, match=message):
        GridConfig.from_dict(values)


def test_every_method_of_an_entry_is_resolved_at_load():
    # client_ranks longer than num_clients fails for the entry's cells when the grid is loaded.
    values = _hetrank_grid()
    values["models"][1]["overrides"]["num_clients"] = 5
    with pytest.raises(ValueError, match=r"models\[minilm-hetrank\]: .*client_ranks has 10 entries for num_clients=5"):
        GridConfig.from_dict(values)
