"""The command lines fail early and in one line: bad --log-level or --device exit 2 before anything starts,
an operational failure exits 1 with what to do (the traceback only with --log-level debug), and every config
key appears in --help with its meaning, read from the config dataclasses."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import SECTIONS, describe_keys

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("module", ["server", "client"])
def test_a_bad_log_level_is_refused_before_anything_starts(module):
    extra = ["--coordinator", "127.0.0.1:1"] if module == "client" else []
    result = _run("-m", module, *extra, "--log-level", "loud")
    assert result.returncode == 2 and "--log-level: 'loud': use one of debug, info, warning, error" in result.stderr


def test_a_client_with_a_device_that_is_no_device_exits_2_before_joining():
    # Nothing listens on port 1: a client that got as far as joining would retry; this one must not get there.
    result = _run("-m", "client", "--coordinator", "127.0.0.1:1", "--device", "gpu", "--patience", "5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --device gpu: use cpu, cuda or cuda:N"]


def test_too_few_clients_is_one_line_and_the_traceback_only_with_debug(tmp_path):
    args = ["-m", "server", "--address", "127.0.0.1:0", "--wait-for-clients", "1", "num_clients=1",
            "model_name=" + _tiny_model(tmp_path), "max_train_samples=40", "max_eval_samples=10"]
    quiet = _run(*args, "--run-dir", str(tmp_path / "a"), timeout=300)
    assert quiet.returncode == 1, quiet.stderr[-2000:]
    last = quiet.stderr.strip().splitlines()[-1]
    assert last == ("error: only 0 of 1 clients joined within 1s; start more clients or lower num_clients "
                    "(run with --log-level debug for the traceback)")
    assert "Traceback" not in quiet.stderr
    loud = _run(*args, "--run-dir", str(tmp_path / "b"), "--log-level", "debug", timeout=300)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "TimeoutError: only 0 of 1" in loud.stderr


def _tiny_model(tmp_path: Path) -> str:
    from common.tiny_models import create_tiny_bert

    return str(create_tiny_bert(tmp_path / "tiny", num_labels=5, seed=0))


def test_every_config_key_has_a_meaning_and_appears_in_help():
    described = {item.key: item for item in describe_keys()}
    assert set(described) == {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    undocumented = sorted(key for key, item in described.items() if not item.meaning)
    assert undocumented == [], f"add a docstring under these fields in common/config.py: {undocumented}"
    help_text = " ".join(_run("-m", "server", "--help").stdout.split())
    for key, item in described.items():
        assert f"{key} (default " in help_text, key
        assert " ".join(item.meaning.replace("``", "").split()[:4]) in help_text, key
