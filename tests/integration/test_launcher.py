"""`make smoke`'s launcher: a real local federation with a tiny model, its console output and exit."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_launcher_runs_a_federation_and_prints_rounds_summary_and_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.local_federation", "--config", "configs/minilm_bbc.yaml", "--tiny-model",
         "--run-dir", str(run_dir), "--timeout", "400", "num_rounds=2", "num_clients=3", "client_fraction=0.6",
         "max_train_samples=150", "max_eval_samples=40", "max_local_steps=2", "method=svd"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=450)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == str(run_dir)
    round_lines = [line for line in lines if line.startswith("round ")]
    assert len(round_lines) == 2 and all("acc " in line and "overlap " in line and " MB" in line for line in round_lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "svd" and summary["rounds_completed"] == 2
    # The saved adapter describes itself and loads with PEFT onto its base model.
    best = run_dir / "adapters" / "best"
    labels = json.loads((best / "labels.json").read_text())["id2label"]
    assert labels == {"0": "business", "1": "entertainment", "2": "politics", "3": "sports", "4": "tech"}
    assert f"svd, round {summary['best_round']}" in (best / "README.md").read_text()
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base_name = json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_name == str(run_dir / "tiny_model")            # a user's own model: as the config named it
    base = AutoModelForSequenceClassification.from_pretrained(base_name, num_labels=5)
    assert PeftModel.from_pretrained(base, str(best)).peft_config["default"].r == 8
    # TensorBoard's reader finds each round's accuracy and bytes of metrics.jsonl in the run's event files.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("eval/accuracy", "accuracy"), ("bytes/bytes_up", "bytes_up"), ("eval/loss", "loss")):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [
            (m["round"], pytest.approx(m[key], rel=1e-6)) for m in metrics]
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["client-0.log", "client-1.log", "client-2.log",
                                                                   "coordinator.log"]


def test_launcher_prints_the_coordinators_status_on_sigusr1(tmp_path):
    import signal
    import threading
    import time

    launcher = subprocess.Popen(
        [sys.executable, "-m", "scripts.local_federation", "--config", "configs/minilm_bbc.yaml", "--tiny-model",
         "--run-dir", str(tmp_path / "run"), "--timeout", "400", "num_rounds=200", "num_clients=2",
         "client_fraction=0.5", "max_train_samples=100", "max_eval_samples=20", "max_local_steps=2"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True)
    reader.start()

    def wait_for(predicate, what: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if launcher.poll() is not None or time.monotonic() > deadline:    # a bound, as harness.wait_for
                raise AssertionError(f"no {what}:\n" + "".join(lines)[-3000:])
            time.sleep(0.2)

    try:
        wait_for(lambda: any(line.startswith("round ") for line in lines), "a first round")
        launcher.send_signal(signal.SIGUSR1)
        wait_for(lambda: any("phase" in line and "committed" in line for line in lines), "the status table")
        wait_for(lambda: sum(line.startswith(("client-0 ", "client-1 ")) for line in lines) == 2, "its clients")
    finally:
        launcher.send_signal(signal.SIGINT)              # the launcher stops every process it started
        launcher.wait(timeout=300)                       # a bound, not a speed check: CI's cores may be busy
        reader.join(timeout=10)
    text = "".join(lines)
    assert re.search(r"^run \S+  method subspace_reg$", text, re.MULTILINE) and "keep-alive" in text, text[-3000:]


def test_launcher_rejects_a_bad_override_before_starting_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scripts.local_federation", "--run-dir", str(tmp_path / "r"),
                             "methd=fedavg"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "did you mean 'method'" in result.stderr
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- clients as torchrun jobs


def test_nproc_per_client_is_a_positive_number_of_processes():
    from scripts.local_federation import parse_args

    assert parse_args([]).nproc_per_client == 1
    assert parse_args(["--nproc-per-client", "2"]).nproc_per_client == 2
    with pytest.raises(SystemExit):
        parse_args(["--nproc-per-client", "0"])


def test_a_plain_client_is_started_as_before():
    from scripts.local_federation import client_launch

    command, env = client_launch(1, "127.0.0.1:5", ["cuda:0", "cuda:1"], 1, {"A": "b"})
    assert command == [sys.executable, "-m", "client", "--coordinator", "127.0.0.1:5", "--name", "client-1",
                       "--partition", "1", "--device", "cuda:1"]
    assert env == {"A": "b"}


def test_a_torchrun_client_stays_on_loopback_and_gets_its_group_of_gpus():
    from scripts.local_federation import client_launch

    devices = ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    command, env = client_launch(0, "127.0.0.1:5", devices, 2, {})
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    words = " ".join(command)
    assert "--nproc-per-node 2" in words and "--rdzv-endpoint 127.0.0.1:0" in words and "--local-addr 127.0.0.1" in words
    assert command[command.index("-m", 3):] == ["-m", "client", "--coordinator", "127.0.0.1:5", "--name", "client-0",
                                                "--partition", "0", "--device", "cuda"]
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert client_launch(1, "a:1", devices, 2, {})[1]["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert client_launch(2, "a:1", devices, 2, {})[1]["CUDA_VISIBLE_DEVICES"] == "0,1"     # round-robin over groups
    # cuda:N counts the GPUs the launcher sees: through its own CUDA_VISIBLE_DEVICES when that is set.
    assert client_launch(1, "a:1", devices, 2, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})[1]["CUDA_VISIBLE_DEVICES"] == "6,7"
    command, env = client_launch(0, "a:1", ["cpu", "cpu"], 2, {})
    assert command[-2:] == ["--device", "cpu"] and "CUDA_VISIBLE_DEVICES" not in env
    assert "--device" not in client_launch(0, "a:1", None, 2, {})[0]                      # the client's default: cpu


@pytest.mark.parametrize("devices, message", [
    (["cuda:0", "cuda:1", "cuda:2"], "3 devices, which do not split into groups of --nproc-per-client 2"),
    (["cuda:0", "cpu"], "all cpu or all numbered GPUs"),
    (["cuda:0", "cuda:0"], "names a GPU twice"),
])
def test_device_groups_that_cannot_work_are_refused_before_anything_starts(tmp_path, devices, message):
    result = subprocess.run([sys.executable, "-m", "scripts.local_federation", "--run-dir", str(tmp_path / "r"),
                             "--nproc-per-client", "2", "--devices", ",".join(devices)],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_launcher_runs_a_round_with_two_rank_clients(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.local_federation", "--config", "configs/minilm_bbc.yaml", "--tiny-model",
         "--run-dir", str(run_dir), "--timeout", "400", "--nproc-per-client", "2", "num_rounds=1", "num_clients=2",
         "max_train_samples=100", "max_eval_samples=40", "max_local_steps=2", "per_device_train_batch_size=4",
         "method=fedavg"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=450)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "of 2 ranks each (torchrun)" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    for index in range(2):
        log = (run_dir / "logs" / f"client-{index}.log").read_text()
        assert f"[client-{index} rank 1/2]" in log and "run over (rank 0 says)" in log, log[-3000:]
