"""A ring of host memory, allocated once, that the converter carves its parameter arrays from.

Why not a fresh ``np.empty`` per parameter: on a virtual machine with free-page reporting (virtio-balloon,
as on the Firecracker machines this was measured on), memory a process frees is handed back to the host
within seconds, and touching it again costs 1.3–2.7 s per GB (page zeroing plus the host's own fault) —
slower than reading, transposing or writing those bytes. Fresh arrays paid that for every byte converted
(a third of the conversion's CPU time was ``clear_page``); the ring pays it once, for its own size, and its
pages stay resident until the conversion ends. The ring is mapped with ``MADV_NOHUGEPAGE``: the host
reclaims free memory in 2 MB blocks, so transparent huge pages (which numpy requests for large arrays) are
exactly the cold ones — touching 1 GB took 2.5–2.7 s in huge pages against 0.6–0.9 s in 4 KB pages, and
the packed transposes run as fast into either.

Arrays are placed one after another, wrapping to the start when the next one does not fit at the end.
Arrays placed since the last :meth:`Ring.seal` form the open batch (the group being filled); ``seal(wait)``
hands them to a pending save, and placing a later array over a sealed one first calls that save's ``wait``
(oldest first: saves finish in order). An array that would overlap the open batch cannot be placed —
:meth:`Ring.fits` says so, and the caller seals (starts that save) first.
"""

from __future__ import annotations

import collections
import mmap
from typing import Any, Callable

import numpy as np

ALIGN = 64                       # bytes: every array starts on a cache line

Region = tuple[int, int]         # [start, stop) byte offsets into the ring


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def ring_bytes(sizes: list[int], slack: int) -> int:
    """A ring for arrays of ``sizes`` bytes: the largest plus ``slack`` (room to fill while it is written),
    or everything (then nothing is ever waited for or overwritten), whichever is smaller."""
    if not sizes:
        return ALIGN
    return min(sum(aligned(s) for s in sizes), aligned(max(sizes)) + aligned(slack))


def _overlaps(a: Region, b: Region) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class Ring:
    """``nbytes`` of host memory handing out arrays in ring order; see the module docstring."""

    def __init__(self, nbytes: int):
        self.buffer = _small_pages(nbytes)
        self._head = 0
        self._open: list[Region] = []
        self._sealed: collections.deque[tuple[list[Region], Callable[[], Any]]] = collections.deque()

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def fits(self, nbytes: int) -> bool:
        """Whether an array of ``nbytes`` can be placed without overwriting the open batch."""
        region = self._where(nbytes)
        return not any(_overlaps(region, r) for r in self._open)

    def array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array in the ring; waits for the sealed batches it overlaps."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not self.fits(nbytes):
            raise RuntimeError(f"Ring: an array of {nbytes} bytes would overwrite the open batch "
                               f"({sum(b - a for a, b in self._open)} bytes in a ring of {self.nbytes}); "
                               "seal it first")
        region = self._where(nbytes)
        while any(_overlaps(region, r) for regions, _ in self._sealed for r in regions):
            _, wait = self._sealed.popleft()
            wait()
        self._open.append(region)
        self._head = min(region[0] + aligned(nbytes), self.nbytes)
        return self.buffer[region[0]:region[1]].view(dtype).reshape(shape)

    def seal(self, wait: Callable[[], Any]) -> None:
        """Hands the open batch to a pending save; ``wait()`` returns once the save no longer reads it."""
        if self._open:
            self._sealed.append((self._open, wait))
            self._open = []

    def _where(self, nbytes: int) -> Region:
        if nbytes > self.nbytes:
            raise ValueError(f"Ring: an array of {nbytes} bytes does not fit a ring of {self.nbytes} bytes")
        start = self._head if self._head + nbytes <= self.nbytes else 0
        return start, start + nbytes


def _small_pages(nbytes: int) -> np.ndarray:
    """``nbytes`` of anonymous memory in base pages (huge pages where the platform cannot opt out)."""
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if advice is None or nbytes == 0:
        return np.empty(nbytes, np.uint8)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(advice)
    return np.frombuffer(region, np.uint8)       # the array keeps the mapping alive


class Scratch:
    """One reusable buffer for read blocks, grown when a block needs more (fresh memory is slow, above)."""

    def __init__(self):
        self._buffer = np.empty(0, np.uint8)

    def array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > self._buffer.nbytes:
            self._buffer = np.empty(nbytes, np.uint8)
        return self._buffer[:nbytes].view(dtype).reshape(shape)
