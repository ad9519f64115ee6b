"""load_task_data: determinism, eval splits, caps, label mapping and clear errors."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from tests

import pytest

from common.config import ConfigError, DataConfig
from common.tasks import TASKS, TaskData, clean_hellaswag_text, hellaswag_context, load_task_data
from tests.common.hellaswag_factory import hellaswag_rows, write_hellaswag_jsonl

TEXTS = [f"text number {i} about {topic}" for i, topic in enumerate(["cats", "dogs", "birds", "fish"] * 10)]
TOPICS = ["cats", "dogs", "birds", "fish"] * 10
REGIONS = ["north", "south"] * 20


def write_csv(path: Path, texts: list[str], labels: list, extra: dict[str, list] | None = None) -> Path:
    extra = extra or {}
    header = ["text", "label", *extra]
    lines = [",".join(header)]
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        lines.append(",".join([text, str(label), *(str(col[i]) for col in extra.values())]))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def topic_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "topics.csv", TEXTS, TOPICS, {"region": REGIONS})


def test_same_config_and_seed_give_identical_rows(topic_csv: Path) -> None:
    cfg = DataConfig(dataset=str(topic_csv), max_eval_samples=None)
    first, second = load_task_data(cfg, seed=7), load_task_data(cfg, seed=7)
    assert first == second
    other = load_task_data(cfg, seed=8)
    assert [r["text"] for r in other.train] != [r["text"] for r in first.train]


def test_string_labels_map_to_sorted_names_and_holdout_partitions_the_data(topic_csv: Path) -> None:
    cfg = DataConfig(dataset=str(topic_csv), eval_fraction=0.25, max_eval_samples=None)
    data = load_task_data(cfg, seed=1)
    assert data.label_names == ["birds", "cats", "dogs", "fish"]
    assert data.num_labels == 4
    assert len(data.eval) == 10 and len(data.train) == 30
    all_rows = data.train + data.eval
    assert sorted(r["text"] for r in all_rows) == sorted(TEXTS)
    for row in all_rows:  # each text keeps its own label
        topic = row["text"].rsplit(" ", 1)[-1]
        assert data.label_names[row["label"]] == topic
    assert data.partition_values == [r["label"] for r in data.train]


def test_int_labels_are_kept_and_json_lines_load(tmp_path: Path) -> None:
    rows = [{"sentence": f"row {i}", "y": i % 3 + 1} for i in range(30)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    data = load_task_data(DataConfig(dataset=str(path), text_column="sentence", label_column="y"), seed=0)
    truth = {r["sentence"]: r["y"] for r in rows}
    assert all(truth[r["text"]] == r["label"] for r in data.train + data.eval)
    assert data.label_names == ["0", "1", "2", "3"]


def test_parquet_file_loads(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"text": TEXTS, "label": TOPICS}).to_parquet(str(path))
    data = load_task_data(DataConfig(dataset=str(path)), seed=0)
    assert len(data.train) + len(data.eval) == len(TEXTS)


@pytest.mark.parametrize("eval_split", ["validation", "test"])
def test_directory_with_an_eval_split_uses_it(tmp_path: Path, eval_split: str) -> None:
    write_csv(tmp_path / "train.csv", TEXTS, TOPICS)
    write_csv(tmp_path / f"{eval_split}.csv", ["held out one", "held out two"], ["cats", "zebras"])
    data = load_task_data(DataConfig(dataset=str(tmp_path), max_eval_samples=None), seed=0)
    assert len(data.train) == len(TEXTS)
    assert sorted(r["text"] for r in data.eval) == ["held out one", "held out two"]
    # one label mapping for both splits
    assert data.label_names == ["birds", "cats", "dogs", "fish", "zebras"]


def test_caps_take_a_seeded_subset(topic_csv: Path) -> None:
    full = load_task_data(DataConfig(dataset=str(topic_csv), max_eval_samples=None), seed=3)
    capped_cfg = DataConfig(dataset=str(topic_csv), max_train_samples=5, max_eval_samples=3)
    capped = load_task_data(capped_cfg, seed=3)
    assert len(capped.train) == 5 and len(capped.eval) == 3 and len(capped.partition_values) == 5
    assert all(row in full.train for row in capped.train)
    assert all(row in full.eval for row in capped.eval)
    assert capped == load_task_data(capped_cfg, seed=3)


def test_partition_field_column_follows_the_train_rows(topic_csv: Path) -> None:
    data = load_task_data(DataConfig(dataset=str(topic_csv), partition_field="region"), seed=5)
    region_of = dict(zip(TEXTS, REGIONS, strict=True))
    assert data.partition_values == [region_of[r["text"]] for r in data.train]


def test_default_partition_field_means_the_label_whatever_its_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "topic": y} for t, y in zip(TEXTS, TOPICS, strict=True)])
    data = load_task_data(DataConfig(dataset=str(path), label_column="topic"), seed=0)
    assert data.partition_values == [r["label"] for r in data.train]


@pytest.mark.parametrize("field_name, overrides, missing", [
    ("text_column", {"text_column": "body"}, "body"),
    ("label_column", {"label_column": "category"}, "category"),
    ("partition_field", {"partition_field": "activity_label"}, "activity_label"),
])
def test_missing_column_is_named_with_the_available_ones(topic_csv: Path, field_name: str,
                                                         overrides: dict, missing: str) -> None:
    with pytest.raises(ValueError) as info:
        load_task_data(DataConfig(dataset=str(topic_csv), **overrides), seed=0)
    message = str(info.value)
    assert field_name in message and repr(missing) in message
    assert "'text'" in message and "'label'" in message and "'region'" in message


def test_unlabelled_rows_are_rejected(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", TEXTS, [-1] * len(TEXTS))
    with pytest.raises(ValueError, match="label_column"):
        load_task_data(DataConfig(dataset=str(path)), seed=0)


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(ConfigError, match="unsupported file type"):
        load_task_data(DataConfig(dataset=str(path)), seed=0)


def test_unreachable_hub_dataset_names_it_and_suggests_a_local_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_task_data(DataConfig(dataset="no-such-owner/no-such-dataset"), seed=0)
    message = str(info.value)
    assert "no-such-owner/no-such-dataset" in message and "local" in message


def test_both_tasks_are_registered() -> None:
    assert set(TASKS) == {"sequence_classification", "multiple_choice"}


def test_classification_rows_carry_the_label_names_as_choices(topic_csv: Path) -> None:
    data = load_task_data(DataConfig(dataset=str(topic_csv)), seed=0)
    assert all(row["choices"] == data.label_names for row in data.train + data.eval)


# --------------------------------------------------------------------------- multiple choice (HellaSwag)


def hellaswag_cfg(path: Path, **overrides) -> DataConfig:
    values = {"task": "multiple_choice", "dataset": str(path), "partition_field": "activity_label",
              "max_eval_samples": None, **overrides}
    return DataConfig(**values)


def test_hellaswag_rows_get_the_reference_context_and_their_endings(tmp_path: Path) -> None:
    path = write_hellaswag_jsonl(tmp_path / "hs.jsonl", 40)
    data = load_task_data(hellaswag_cfg(path), seed=3)
    assert data.label_names == ["0", "1", "2", "3"] and data.num_labels == 4
    assert len(data.train) + len(data.eval) == 40 and len(data.eval) == 8
    source = {(r["ctx_a"], r["ctx_b"]): r for r in hellaswag_rows(40)}
    by_context = {hellaswag_context(a, b): r for (a, b), r in source.items()}
    for row in data.train + data.eval:
        assert set(row) == {"context", "endings", "label"}
        original = by_context[row["context"]]
        assert row["endings"] == original["endings"] and row["label"] == int(original["label"])
        assert "[title]" not in row["context"]
    assert "Baking cookies.  Scene 25. A woman mixes flour and sugar in a bowl. she" in {
        r["context"] for r in data.train + data.eval}
    assert load_task_data(hellaswag_cfg(path), seed=3) == data


def test_hellaswag_context_is_ctx_a_space_ctx_b_with_titles_turned_into_full_stops() -> None:
    assert hellaswag_context("A man is on a roof.", "he") == "A man is on a roof. he"
    assert hellaswag_context("Roofing [title] Remove the nails.", "") == "Roofing.  Remove the nails."
    assert hellaswag_context("Only a.", None) == "Only a."


def test_hellaswag_partitions_follow_activity_label_or_the_label(tmp_path: Path) -> None:
    path = write_hellaswag_jsonl(tmp_path / "hs.jsonl", 40, string_labels=False)
    data = load_task_data(hellaswag_cfg(path), seed=0)
    activity_of = {hellaswag_context(r["ctx_a"], r["ctx_b"]): r["activity_label"] for r in hellaswag_rows(40)}
    assert data.partition_values == [activity_of[r["context"]] for r in data.train]
    by_label = load_task_data(hellaswag_cfg(path, partition_field="label"), seed=0)
    assert by_label.partition_values == [r["label"] for r in by_label.train]


def test_hellaswag_directory_evaluates_on_its_validation_split(tmp_path: Path) -> None:
    write_hellaswag_jsonl(tmp_path / "train.jsonl", 24)
    write_hellaswag_jsonl(tmp_path / "validation.jsonl", 6)
    data = load_task_data(hellaswag_cfg(tmp_path), seed=0)
    assert len(data.train) == 24 and len(data.eval) == 6


def test_hellaswag_with_only_a_ctx_column(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k not in ("ctx_a", "ctx_b")} for r in hellaswag_rows(20)]
    data = load_task_data(hellaswag_cfg(write_jsonl(tmp_path / "hs.jsonl", rows)), seed=0)
    assert {r["context"] for r in data.train + data.eval} <= {clean_hellaswag_text(r["ctx"]) for r in rows}


@pytest.mark.parametrize("breakage, message", [
    ("unlabelled", "A split without labels"),
    ("out_of_range", "0..3"),
    ("ragged", "different numbers of endings"),
    ("no_endings", "endings column 'endings'"),
])
def test_bad_hellaswag_files_are_clear_errors(tmp_path: Path, breakage: str, message: str) -> None:
    rows = hellaswag_rows(20)
    if breakage == "unlabelled":
        rows[3]["label"] = ""
    elif breakage == "out_of_range":
        rows[3]["label"] = "4"
    elif breakage == "ragged":
        rows[3]["endings"] = rows[3]["endings"][:3]
    else:
        rows = [{k: v for k, v in r.items() if k != "endings"} for r in rows]
    with pytest.raises(ValueError, match=message):
        load_task_data(hellaswag_cfg(write_jsonl(tmp_path / "hs.jsonl", rows)), seed=0)


def test_hellaswag_hub_id_offline_is_a_config_error_that_suggests_a_local_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_task_data(DataConfig(task="multiple_choice", dataset="hellaswag"), seed=0)
    assert "'hellaswag'" in str(info.value) and "local" in str(info.value)


def test_embedded_bbc_news() -> None:
    cfg = DataConfig(dataset="bbc_news", max_eval_samples=None)
    data = load_task_data(cfg, seed=42)
    assert isinstance(data, TaskData)
    assert len(data.train) + len(data.eval) == 2225
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(data.eval) == round(2225 * cfg.eval_fraction)
    counts = Counter(r["label"] for r in data.train + data.eval)
    assert sorted(counts) == [0, 1, 2, 3, 4] and counts[3] == 511  # sports has 511 articles
    assert data.partition_values == [r["label"] for r in data.train]
    assert all(r["text"].strip() for r in data.train[:50])
    assert load_task_data(cfg, seed=42) == data


def test_dataset_split_chooses_the_training_split(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["unused one", "unused two"], ["cats", "dogs"])
    write_csv(tmp_path / "test.csv", TEXTS, TOPICS)
    write_csv(tmp_path / "validation.csv", ["held out one", "held out two"], ["cats", "fish"])
    data = load_task_data(DataConfig(dataset=str(tmp_path), dataset_split="test", max_eval_samples=None), seed=0)
    assert sorted(r["text"] for r in data.train) == sorted(TEXTS)
    assert sorted(r["text"] for r in data.eval) == ["held out one", "held out two"]
    with pytest.raises(ConfigError, match="has no 'dev' split .*set dataset_split to one of them"):
        load_task_data(DataConfig(dataset=str(tmp_path), dataset_split="dev"), seed=0)


def test_a_hub_dataset_is_loaded_with_its_configuration_and_revision(monkeypatch) -> None:
    # No hub here: what reaches datasets.load_dataset is what the hub would be asked for.
    import datasets

    asked = {}

    def fake_load_dataset(path, name=None, **kwargs):
        asked.update(path=path, name=name, **kwargs)
        rows = datasets.Dataset.from_dict({"sentence": TEXTS, "label": [i % 2 for i in range(len(TEXTS))]})
        return datasets.DatasetDict({"train": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    revision = "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c"
    cfg = DataConfig(dataset="nyu-mll/glue", dataset_config="sst2", dataset_revision=revision, text_column="sentence")
    data = load_task_data(cfg, seed=0)
    assert asked == {"path": "nyu-mll/glue", "name": "sst2", "revision": revision}
    assert data.label_names == ["0", "1"] and len(data.train) + len(data.eval) == len(TEXTS)
