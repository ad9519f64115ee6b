"""Quiet Hugging Face loading, shared by every module that loads or saves a transformers model.

A leaf module (it imports no other project module), so that ``common.modeling``,
``common.gguf_models`` and ``common.tiny_models`` can all use it without importing
each other in a circle: ``modeling -> gguf_models`` is the only edge between those two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No load reports or progress bars from every client; restores the caller's settings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
