"""Keep glibc from returning each batch's activations to the system only to page-fault them back in the next batch.

A ViT-B/16 batch allocates blocks above glibc's default 128 KiB-32 MiB mmap threshold: every such block is mapped
fresh and unmapped on release, which page-faults 190-250 thousand times per CPU batch of 16. Raising the thresholds
keeps freed blocks in the heap for reuse (the same as `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824
MALLOC_TOP_PAD_=67108864` in the environment). Settings the user gave in the environment are left alone.
"""

import ctypes
import os
import sys

from transformers.utils import logging


logger = logging.get_logger(__name__)

# mallopt parameter numbers (glibc's malloc.h) and the values chosen.
MALLOPT_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": (-3, 32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": (-1, 2**30),
    "MALLOC_TOP_PAD_": (-2, 64 * 2**20),
}


def keep_freed_memory_for_reuse() -> bool:
    """Apply the settings with `mallopt` (Linux with glibc only); returns whether they were applied."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOPT_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    applied = all(mallopt(parameter, value) == 1 for parameter, value in MALLOPT_SETTINGS.values())
    logger.info("glibc malloc tuned for large batches: %s", applied)
    return applied


__all__ = ["keep_freed_memory_for_reuse"]
