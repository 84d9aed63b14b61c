"""Host memory held by the process while timing, so that no call pays the kernel for memory again.

glibc's malloc serves a request above its mmap threshold (128 KiB at first, rising with use to at most 32 MiB)
with a fresh ``mmap`` that ``free`` hands back to the kernel, and it trims the free top of its heap past a trim
threshold. A model whose activations pass those sizes then pays page faults and page zeroing on every call:
work that is in no convolution, whose amount depends on the order in which a model allocates and frees, and
so differs between two forms of one model timed side by side. Measured on the 2-core benchmark machine
(``benchmarks/run.py`` with and without ``--system-allocator``, regnet_y_400mf, batch 16, eager, two runs
each; README, Benchmarks): the original model 214-241 ms per call with glibc's defaults, 142-150 ms with
freed memory held; unfused / original 1.05 with the defaults, 1.20-1.27 held.

:func:`hold_freed_memory` sets glibc's ``M_MMAP_MAX`` to 0 (every block from the heap) and ``M_TRIM_THRESHOLD``
to its maximum (the heap is not trimmed), as jemalloc and tcmalloc, the allocators CPU inference guides
recommend, keep freed memory by design. The benchmarks call it before they build anything, and their tables
record :func:`host_memory_state`. onnxruntime allocates from its own arena and is unaffected either way. The
library never calls it: it changes the whole process's allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

HELD = "freed memory held (glibc mallopt: M_MMAP_MAX 0, M_TRIM_THRESHOLD 2^31-1)"
DEFAULT = "the system allocator's defaults"

_state = DEFAULT


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def hold_freed_memory() -> str:
    """Make glibc keep freed memory in the process (see the module's text); returns :func:`host_memory_state`.

    Where the C library is not glibc (macOS, musl, Windows) nothing changes and the state says so; a warning
    is logged, since eager and torch.compile timings then include whatever the allocator does."""
    global _state
    libc = _glibc()
    if libc is None:
        log.warning("not glibc: the allocator is left as it is; eager and compile timings include its page faults")
        _state = DEFAULT + " (not glibc: left as is)"
        return _state
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) != 1:
        log.warning("glibc's mallopt refused the settings: the allocator is left as it is")
        _state = DEFAULT + " (mallopt refused)"
        return _state
    _state = HELD
    return _state


def host_memory_state() -> str:
    """How this process's allocator handles freed memory, one phrase for a benchmark table's header."""
    return _state
