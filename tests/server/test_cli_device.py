"""The coordinator's --device: where it evaluates, checked before anything loads."""

from __future__ import annotations

import pytest
import torch

from common.devices import device_problem as check_device
from server.__main__ import main, parse_args


def test_default_is_left_to_the_model_and_cpu_is_always_fine():
    assert parse_args([]).device is None          # ServerModel then takes default_device(): cuda:0 or cpu
    assert check_device(None) is None and check_device("cpu") is None


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda0"])
def test_a_device_that_is_no_device_is_named(device):
    assert check_device(device) == f"--device {device}: use cpu, cuda or cuda:N"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without CUDA")
def test_a_gpu_on_a_host_without_one_exits_2_before_loading(tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path / "run"), "--device", "cuda:1"]) == 2
    assert "--device cuda:1 but CUDA is not available here; use --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_device_reaches_the_evaluation_model(monkeypatch, tmp_path):
    import server.app as app

    seen = {}
    monkeypatch.setattr(app, "serve", lambda *args, **kwargs: seen.update(kwargs) or {"status": "completed"})
    assert main(["--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 0
    assert seen["device"] == "cpu"


def test_threads_must_be_positive_and_default_to_torchs(tmp_path, capsys):
    assert parse_args([]).threads is None
    assert main(["--run-dir", str(tmp_path / "run"), "--threads", "0"]) == 2
    assert "--threads 0: give a positive number of threads" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
