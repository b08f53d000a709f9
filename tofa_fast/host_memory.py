"""Keep the host memory a CPU training step frees, instead of handing it back to the kernel.

Why: every step on the CPU allocates and frees the same megabytes of activations and gradients.
glibc's malloc serves blocks above its mmap threshold with fresh ``mmap`` calls, unmaps them on
free, and trims the top of its heap back to the kernel once more than the trim threshold lies free
there (both thresholds move with the allocation history). Memory handed back and requested again is
faulted in again page by page, and the kernel zero-fills every page: about 0.8 µs per 4 KiB on the
2-core machine, so ``x.clone()`` of a 17 MB tensor takes 4× as long as copying it into one that
exists. A default digits step took ~13,000 such faults, an ``ofa_mbv3`` 128 px step ~134,000.
With the settings below they drop to ~300 and ~6,000, and the steps get 1.09× and 1.07× as fast
(sequential step, 2 threads: ``bench/test_bench_host_memory.py``, results in bench/results/). In
whole training runs the epochs were about 2 % shorter (``--step shared``, data loading and the optimizer
dilute it), and the peak RSS 9–32 % higher.

What :func:`retain_freed_host_memory` sets, through ``mallopt``:

* ``M_MMAP_MAX = 0``: no block is served by its own ``mmap`` (threads' arenas still fall back to
  it past their 64 MiB heaps);
* ``M_TRIM_THRESHOLD`` out of reach: the heap's free top is kept;
* ``M_TOP_PAD = 64 MiB``: the heap grows in large steps while the first steps find its size.

The cost: the process holds on to its peak heap, fragments included, until it exits.
It is a process-wide policy, so the library never applies it behind a caller's back: the
``tofa-fast`` command (which owns its process) calls it for the commands that run networks on the
CPU, and a script can call it itself. ``TOFA_FAST_HOST_MEMORY=system`` turns it off. Where the C
library is not glibc (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["ENV", "describe_policy", "retain_freed_host_memory"]

#: ``system`` leaves the C library's allocator as it is
ENV = "TOFA_FAST_HOST_MEMORY"

# mallopt parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20))

_applied: bool | None = None  # the outcome of the first call


def retain_freed_host_memory() -> bool:
    """Make this process's C allocator keep the memory it frees (module docstring). Idempotent.

    Returns:
        True when the settings are in force; False where the C library is not glibc, ``mallopt``
        refused a setting, or ``TOFA_FAST_HOST_MEMORY=system`` asked to leave the allocator alone.

    Raises:
        ValueError: ``TOFA_FAST_HOST_MEMORY`` is neither ``retain`` nor ``system``.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def describe_policy() -> str:
    """What the commands do with freed host memory here, in words (``tofa-fast info``)."""
    try:
        choice = _choice()
    except ValueError as exc:
        return str(exc)
    if choice == "system":
        return f"the C library's own policy ({ENV}=system)"
    if not _is_glibc():
        return "the C library's own policy (not glibc: nothing to set)"
    return f"kept by the heap (glibc mallopt: no mmap blocks, no trimming; {ENV}=system to turn off)"


def _choice() -> str:
    choice = os.environ.get(ENV, "retain").strip().lower() or "retain"
    if choice not in ("retain", "system"):
        raise ValueError(f"{ENV} must be 'retain' (the default) or 'system', got {os.environ[ENV]!r}")
    return choice


def _is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _apply() -> bool:
    if _choice() == "system" or not _is_glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
