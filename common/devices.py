"""Checking a --device value on this host before anything starts (coordinator and client alike)."""

from __future__ import annotations

import logging

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def device_problem(device: str | None) -> str | None:
    """What is wrong with ``--device`` on this host, or None: cpu, cuda and cuda:N are understood, and a CUDA
    device must exist here (so that ``--device gpu`` or a missing GPU fails at once, not after joining)."""
    if device is None or device == "cpu":
        return None
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        return f"--device {device}: use cpu, cuda or cuda:N"
    import torch

    if not torch.cuda.is_available():
        return f"--device {device} but CUDA is not available here; use --device cpu"
    if device != "cuda" and int(device[5:]) >= torch.cuda.device_count():
        return (f"--device {device} but this host has {torch.cuda.device_count()} GPU(s): cuda:0..cuda:"
                f"{torch.cuda.device_count() - 1}")
    return None


def log_level(text: str) -> int:
    """An argparse type for --log-level: a level name in any case, refused before anything starts."""
    import argparse

    name = text.strip().upper()
    if name not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(level.lower() for level in LOG_LEVELS)}")
    return getattr(logging, name)
