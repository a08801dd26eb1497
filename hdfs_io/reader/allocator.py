"""The allocator settings of a process that reads: glibc malloc keeps what it frees instead of handing it back.

A reader allocates and frees the same sizes over and over: a chunk's records, built on the
fetcher's prefetch thread (a glibc thread arena) and freed on the decoding thread; decoded
audio; features; a batch's padded arrays. glibc's defaults give such memory back to the
kernel (allocations past the mmap threshold are unmapped when freed; a thread arena's heap
is shrunk once its free top passes the trim threshold), so the next chunk faults every page
in again. Measured on bench/work/quality-2000 in one process: 475 minor faults an utterance
and 20.7 s, against 16 and 15.9 s with the settings below (bench/README.md, peers).

Fixed thresholds keep blocks up to MMAP_THRESHOLD_BYTES in the heaps and let a heap keep up to
TRIM_THRESHOLD_BYTES of free memory at its top: a process holds at most that much more than
it uses, per arena. Other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 << 20  # blocks up to this come from the heaps: a 16 MB chunk's buffers, a batch's arrays
TRIM_THRESHOLD_BYTES = 128 << 20  # free memory a heap keeps at its top before giving it back


@functools.cache
def keep_freed_memory() -> bool:
    """Sets this process's malloc thresholds (once); returns whether the C library took them."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) & bool(mallopt(M_TRIM_THRESHOLD,
                                                                                TRIM_THRESHOLD_BYTES))
