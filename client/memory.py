"""A client holds the memory it uses: glibc's allocator told to give freed activations back.

A training step allocates and frees a few hundred activation tensors of 1-6 MB (MiniLM, batch 16 x 64
tokens: about 220 MB saved for the backward pass). glibc serves a block above its mmap threshold with a
mapping of its own and unmaps it when freed, but the threshold is dynamic: the first such block freed
raises it to that block's size (up to 32 MiB), and from then on activations come from the main heap, which
fragments and is not given back. A client of the default run held about 0.95 GB between rounds, and
1.08 GB at peak, of which about 0.47 GB and 0.7 GB were in use (bench/client_memory.py). So a client

- fixes the mmap threshold at glibc's own starting value, 128 KiB (fixing it also stops the dynamic
  raise of the trim threshold): a large tensor goes back to the system when it is freed;
- after each round, calls ``malloc_trim(0)``: the free pages left inside the heap go back too, so an idle
  client (7 of the 10 of the default run at any time) holds what it uses.

Neither changes a computed value: only where freed memory goes. Elsewhere than glibc, or where the
environment sets MALLOC_MMAP_THRESHOLD_ (the user's own choice), the threshold is left alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc's malloc.h)."""
MMAP_THRESHOLD_BYTES = 128 * 1024
"""glibc's default starting threshold; setting it explicitly is what keeps it from rising."""
THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at 128 KiB for the rest of the process; True where it was set."""
    if THRESHOLD_ENV in os.environ:
        return False
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not done:
        log.warning("mallopt(M_MMAP_THRESHOLD) failed; freed activations may stay in the heap")
    return done


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system (``malloc_trim(0)``); True where glibc released any."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
