"""The experiment grid: which (model, method, seed) cells to run, read from a small YAML file.

    base_config: configs/minilm_bbc.yaml     # run configuration every cell starts from
    output_root: runs/cpu_grid               # cells go to <output_root>/<model>/<method>/seed<seed>
    methods: [fedavg, svd, fedsvd, subspace_reg]
    seeds: [42, 43, 44]
    models:                                  # each: a name, optionally its own config and overrides
      - name: minilm
        overrides: {model_name: minilm}
      - name: minilm-hetrank                 # a scenario: another entry, run for some of the methods
        overrides: {model_name: minilm, client_ranks: [8, 2, 4, 8, 2, 4, 8, 2, 4, 8]}
        methods: [fedavg, svd]               # a subset of the grid's methods (default: all of them)
    overrides: {num_rounds: 20}              # applied to every cell (before the model's own)
    launcher_args: []                        # extra options of scripts.local_federation, e.g. [--tiny-model]
    cell_timeout_s: 7200                     # the launcher's --timeout for one cell
    report_dir: null                         # default <output_root>/report

Every cell's configuration is resolved (and so validated) when the grid is loaded: a typo in
an override fails before hours of runs, not in the ninth cell.

A "model" entry is really a scenario: its name is the directory (and the report's section) of its
cells, so the same model under other settings (heterogeneous client ranks, say) is a second entry,
and its ``methods`` keeps it to the methods that scenario is meant to compare.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from common.config import ConfigError, RunConfig
from common.methods import method_names

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _unknown_key_error(where: str, key: str, known: list[str]) -> ValueError:
    nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"did you mean {nearest[0]!r}?" if nearest else f"known keys: {', '.join(sorted(known))}"
    return ValueError(f"{where}: unknown key {key!r}; {hint}")


def _check_keys(where: str, values: dict[str, Any], cls: type) -> None:
    known = [f.name for f in fields(cls)]
    for key in values:
        if key not in known:
            raise _unknown_key_error(where, str(key), known)


def _string_list(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{where}={value!r}: expected a list of strings, e.g. [--tiny-model]")
    return list(value)


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}={value!r}: expected a mapping of config key: value, e.g. {{num_rounds: 5}}")
    return dict(value)


@dataclass
class ModelSpec:
    """One model of the grid: a name (its directory under output_root) and how it differs from the base."""

    name: str
    """Directory name of the model's cells; letters, digits, '.', '_' and '-'."""
    config: str | None = None
    """Its own run configuration instead of the grid's base_config (e.g. configs/smollm_360m_hellaswag.yaml)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config overrides for this model's cells, applied after the grid's overrides."""
    launcher_args: list[str] = field(default_factory=list)
    """Extra launcher options for this model's cells, after the grid's launcher_args."""
    methods: list[str] | None = None
    """The methods of this entry's cells, a subset of the grid's methods (checked by GridConfig);
    null: all of them. Lets a scenario (e.g. heterogeneous client ranks) run only where it is meaningful."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _SAFE_NAME.match(self.name):
            raise ValueError(f"models: name={self.name!r} is not a usable directory name; use letters, digits, "
                             f"'.', '_' and '-', e.g. roberta-large")
        self.overrides = _mapping(f"models[{self.name}].overrides", self.overrides)
        self.launcher_args = _string_list(f"models[{self.name}].launcher_args", self.launcher_args)
        if self.methods is not None:
            where = f"models[{self.name}].methods"
            if not isinstance(self.methods, list) or not self.methods \
                    or not all(isinstance(m, str) for m in self.methods):
                raise ValueError(f"{where}={self.methods!r}: expected a non-empty list of method names, "
                                 f"e.g. [fedavg, svd], or no methods key for all of the grid's methods")
            self.methods = list(self.methods)
        for key in ("method", "seed"):
            if key in self.overrides:
                raise ValueError(f"models[{self.name}].overrides sets {key!r}, which the grid sets per cell; "
                                 f"list it under the grid's {key}s instead")

    @classmethod
    def from_dict(cls, index: int, values: Any) -> "ModelSpec":
        if not isinstance(values, dict):
            raise ValueError(f"models[{index}]={values!r}: expected a mapping with at least a name, "
                             f"e.g. {{name: minilm, overrides: {{model_name: minilm}}}}")
        _check_keys(f"models[{index}]", values, cls)
        if "name" not in values:
            raise ValueError(f"models[{index}]: missing 'name' (the model's directory under output_root)")
        return cls(**values)


@dataclass(frozen=True)
class Cell:
    """One federation of the grid."""

    model: ModelSpec
    method: str
    seed: int
    config_path: Path
    """The run configuration the launcher starts from."""
    overrides: dict[str, Any]
    """Every override of this cell in order: grid, model, then method and seed."""
    num_rounds: int
    """As resolved from config_path + overrides: the number of metrics lines of a finished cell."""
    run_dir: Path
    launcher_args: tuple[str, ...]
    expected: dict[str, Any]
    """Config values a finished run of this cell has in its config.yaml (method, seed, num_rounds and every
    overridden key): a run left by an older version of the grid file is not taken for this cell's."""

    @property
    def label(self) -> str:
        return f"{self.model.name}/{self.method}/seed{self.seed}"


@dataclass
class GridConfig:
    """A grid file, validated: every list non-empty, every name known, every cell's config valid."""

    base_config: str
    """Run configuration every cell starts from (a model may name its own)."""
    methods: list[str]
    seeds: list[int]
    models: list[ModelSpec]
    output_root: str = "runs/grid"
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config overrides for every cell (e.g. num_rounds: 5)."""
    launcher_args: list[str] = field(default_factory=list)
    """Extra options of scripts.local_federation for every cell (e.g. [--tiny-model] or [--devices, cuda:0])."""
    cell_timeout_s: float = 7200.0
    """The launcher's --timeout: one cell taking longer is stopped and counted as failed."""
    report_dir: str | None = None
    """Where the report goes after the grid (default: <output_root>/report)."""

    def __post_init__(self) -> None:
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError(f"methods={self.methods!r}: expected a non-empty list, e.g. [fedavg, subspace_reg]")
        for method in self.methods:
            if method not in method_names():
                nearest = difflib.get_close_matches(str(method), method_names(), n=1, cutoff=0.5)
                hint = f"did you mean {nearest[0]!r}?" if nearest else f"use one of {', '.join(method_names())}"
                raise ValueError(f"methods: unknown method {method!r}; {hint}")
        if not isinstance(self.seeds, list) or not self.seeds:
            raise ValueError(f"seeds={self.seeds!r}: expected a non-empty list of integers, e.g. [42, 43, 44]")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"seeds: {seed!r} is not an integer")
        if not isinstance(self.models, list) or not self.models:
            raise ValueError("models: expected a non-empty list, e.g. [{name: minilm}]")
        self.models = [m if isinstance(m, ModelSpec) else ModelSpec.from_dict(i, m) for i, m in enumerate(self.models)]
        for name, items in (("methods", self.methods), ("seeds", self.seeds),
                            ("models", [m.name for m in self.models]),
                            *((f"models[{m.name}].methods", m.methods) for m in self.models if m.methods)):
            duplicates = sorted({str(item) for item in items if items.count(item) > 1})
            if duplicates:
                raise ValueError(f"{name}: {', '.join(duplicates)} listed more than once")
        for model in self.models:
            self._check_model_methods(model)
        self.overrides = _mapping("overrides", self.overrides)
        for key in ("method", "seed"):
            if key in self.overrides:
                raise ValueError(f"overrides sets {key!r}, which the grid sets per cell; use the {key}s list")
        self.launcher_args = _string_list("launcher_args", self.launcher_args)
        if not isinstance(self.cell_timeout_s, (int, float)) or self.cell_timeout_s <= 0:
            raise ValueError(f"cell_timeout_s={self.cell_timeout_s!r}: expected a positive number of seconds")
        if not isinstance(self.output_root, str) or not self.output_root:
            raise ValueError(f"output_root={self.output_root!r}: expected a directory, e.g. runs/cpu_grid")
        # Resolving each (model, method) configuration checks the config files, every override key and any
        # method-specific rule (a method that rejects client_ranks, say) now, not when its cell comes up.
        for model in self.models:
            for method in self.methods_of(model):
                self._resolve(model, method, self.seeds[0])

    def _check_model_methods(self, model: ModelSpec) -> None:
        """An entry's methods must be registered and in the grid's list (which orders the cells and the report)."""
        if model.methods is None:
            return
        where = f"models[{model.name}].methods"
        unregistered = [m for m in model.methods if m not in method_names()]
        if unregistered:
            raise ValueError(f"{where}: unknown method(s) {', '.join(map(repr, unregistered))}; "
                             f"use one of {', '.join(method_names())}")
        outside = [m for m in model.methods if m not in self.methods]
        if outside:
            raise ValueError(f"{where}: {', '.join(map(repr, outside))} not in the grid's methods "
                             f"({', '.join(self.methods)}); add them to the grid's methods or drop them here")

    def methods_of(self, model: ModelSpec) -> list[str]:
        """The methods of ``model``'s cells, in the grid's order: its own subset, else all of the grid's."""
        if model.methods is None:
            return list(self.methods)
        return [m for m in self.methods if m in model.methods]

    def describe(self) -> str:
        """The grid's shape for progress lines: 'M models x K methods x S seeds', or per entry when they differ."""
        counts = [len(self.methods_of(m)) for m in self.models]
        if all(count == len(self.methods) for count in counts):
            return f"{len(self.models)} models x {len(self.methods)} methods x {len(self.seeds)} seeds"
        per_model = ", ".join(f"{m.name}: {count}" for m, count in zip(self.models, counts))
        return f"{len(self.models)} models x methods ({per_model}) x {len(self.seeds)} seeds"

    @classmethod
    def load(cls, path: str | Path) -> "GridConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"grid file {str(path)!r} does not exist; see configs/grid_cpu.yaml for an example")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level (base_config, methods, seeds, models, ...)")
        return cls.from_dict(values, where=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "grid") -> "GridConfig":
        _check_keys(where, values, cls)
        missing = [f.name for f in fields(cls) if f.name in ("base_config", "methods", "seeds", "models")
                   and f.name not in values]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}; a grid needs base_config, methods, seeds "
                             f"and models")
        return cls(**values)

    def _config_path(self, model: ModelSpec) -> Path:
        return Path(model.config or self.base_config)

    def _resolve(self, model: ModelSpec, method: str, seed: int) -> tuple[dict[str, Any], RunConfig]:
        overrides = {**self.overrides, **model.overrides, "method": method, "seed": seed}
        try:
            config = RunConfig.load(self._config_path(model), overrides)
        except ConfigError as error:
            raise ValueError(f"models[{model.name}]: {error}") from None
        return overrides, config

    def cells(self) -> list[Cell]:
        """Every (model, method, seed), models outermost: one model's table is complete before the next starts."""
        cells = []
        for model in self.models:
            for method in self.methods_of(model):
                for seed in self.seeds:
                    overrides, config = self._resolve(model, method, seed)
                    launcher_args = (*self.launcher_args, *model.launcher_args)
                    resolved = config.to_flat()
                    checked = {"method", "seed", "num_rounds", *overrides}
                    if "--tiny-model" in launcher_args:
                        checked.discard("model_name")   # the launcher replaces it with the tiny model's path
                    cells.append(Cell(
                        model=model, method=method, seed=seed, config_path=self._config_path(model),
                        overrides=overrides, num_rounds=config.federation.num_rounds,
                        run_dir=Path(self.output_root) / model.name / method / f"seed{seed}",
                        launcher_args=launcher_args, expected={k: resolved[k] for k in sorted(checked)},
                    ))
        return cells

    @property
    def report_path(self) -> Path:
        return Path(self.report_dir) if self.report_dir else Path(self.output_root) / "report"
