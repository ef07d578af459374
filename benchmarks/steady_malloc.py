"""Keep glibc's malloc from returning freed memory to the OS, so timings measure code, not page faults.

glibc serves blocks above a threshold with ``mmap`` and unmaps them on free, and trims the heap
top; both thresholds move with the allocation history. A training step frees and reallocates
multi-MB activations and gradients, so two identical loops in one process can differ by ~2,000
page faults per step (about 10% of a 20 ms CPU step) depending on what ran before them: a ratio
would then measure the heap's history. With fixed thresholds, memory freed by one step serves
the next. This is the effect of PyTorch's CPU tuning advice (tcmalloc or jemalloc), with glibc's
own ``mallopt``. Every variant of a benchmark runs under the same setting.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit
_NEVER_TRIM = 2**31 - 1


def steady() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; returns False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def add_argument(ap: argparse.ArgumentParser) -> None:
    """The ``--default-malloc`` flag every timing benchmark shares."""
    ap.add_argument(
        "--default-malloc", action="store_true",
        help="keep glibc's adaptive malloc thresholds instead of fixing them (see benchmarks/steady_malloc.py)",
    )


def apply(args: argparse.Namespace) -> str:
    """Apply the setting ``args`` asks for; returns what was used ("steady" or "default"), for the JSON."""
    if args.default_malloc:
        return "default"
    return "steady" if steady() else "default"
