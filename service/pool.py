"""The state pool: one preallocated array per state tensor, a slot per session, and the sessions'
bookkeeping as columns beside it.

Arrays are laid out [dim0, slots, dim1] so that gathering a batch's states is one fancy-indexed read
that already has the graph's [dim0, batch, dim1] shape, and scattering is one indexed write. Columns
(`add_column`) are arrays [slots, ...] that grow and shrink with the pool, so a session costs array
entries, not Python objects. The pool's own column `flags` marks a slot in use (bit USED; the session
table keeps its own bits in the same byte). The pool grows by doubling up to its cap; when three quarters
of it are free it halves (down to its initial size) as far as its highest used slot allows, and the free
slots below are then handed out lowest first, so a pool that drains gives its memory back. Freed slots
are a numpy stack; slots never handed out since the last resize are handed out in order by a counter, so
the stack's pages are only touched by slots that were freed. After a resize the C heap is trimmed
(`trim_heap`), so that the temporaries of large copies go back to the system. A lock makes resizing,
gather and scatter safe between the event loop (which acquires and releases slots) and the worker thread
(which gathers and scatters); columns belong to the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from collections.abc import Callable

import numpy as np

from gatecast.manifest import StateSpec

from .errors import ResourceExhausted

USED = 1  # bit of the `flags` column: the slot is acquired (the session table owns the other bits)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 1 << 20  # allocations from 1 MiB up are mappings of their own, unmapped when freed
TRIM_THRESHOLD = 4 << 20


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc, else None (musl, macOS: freed heap memory stays with the process)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    libc = _glibc()
    fn = getattr(libc, "malloc_trim", None)
    if fn is None:
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn  # type: ignore[no-any-return]


_TRIM = _malloc_trim()
_heap_tuned = False


def tune_heap() -> bool:
    """Once per process, on glibc: a fixed mmap threshold of 1 MiB. glibc otherwise raises it (up to 32 MiB)
    each time a mapped block is freed, so that after the pool's first resize its columns, the id index and
    every later array up to that size come from the heaps, where a freed one leaves resident holes (in a
    process holding only a session table of 1,000,000 sessions: 5 MiB more RSS). Smaller arrays (a batch's
    states) still come from the heaps."""
    global _heap_tuned
    libc = _glibc()
    if _heap_tuned or libc is None or not hasattr(libc, "mallopt"):
        return _heap_tuned
    _heap_tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _heap_tuned


def trim_heap() -> None:
    """Gives the C heap's free pages back to the system (glibc's malloc_trim(0); nothing elsewhere). Freed
    numpy arrays below glibc's mmap threshold (which rises up to 32 MiB as large arrays are freed) stay
    resident otherwise."""
    if _TRIM is not None:
        _TRIM(0)


class StatePool:
    def __init__(self, specs: list[StateSpec], initial: int, cap: int) -> None:
        self.specs = specs
        self.cap = cap
        self.initial = max(1, min(initial, cap))
        tune_heap()
        self._lock = threading.Lock()
        size = self.initial
        self._arrays = [np.zeros((s.dims[0], size, s.dims[1]), np.float32) for s in specs]
        self.columns: dict[str, np.ndarray] = {"flags": np.zeros(size, np.uint8)}
        self._free = np.zeros(size, np.int32)  # a stack of freed slots below `_fresh`: the top (end) goes first
        self._top = 0  # slots on the stack
        self._fresh = 0  # slots from here up have not been handed out since the last resize
        self._used = 0
        self._shrink_at = 0  # try to shrink when `used` falls to this (set on every resize)

    @property
    def capacity(self) -> int:
        return self._arrays[0].shape[1]

    @property
    def used(self) -> int:
        return self._used

    def add_column(self, name: str, dtype: np.typing.DTypeLike, shape: tuple[int, ...] = ()) -> np.ndarray:
        """A zeroed array [capacity, *shape] kept beside the states (resized with them); returns it. Read it
        from `columns` after any acquire or release: a resize replaces the array."""
        if name not in self.columns:
            self.columns[name] = np.zeros((self.capacity, *shape), dtype)
        return self.columns[name]

    def acquire(self) -> int:
        if self._top == 0 and self._fresh == self.capacity:
            self._resize(self._grown())
        if self._top:
            self._top -= 1
            slot = int(self._free[self._top])
        else:
            slot = self._fresh
            self._fresh += 1
        self.columns["flags"][slot] = USED
        self._used += 1
        return slot

    def release(self, slots: int | np.ndarray) -> None:
        """Zeroes the slots' states and columns (`flags` too: no longer USED) and hands them back (one slot,
        or distinct slots in one write per array); may shrink the pool."""
        n = np.size(slots)
        with self._lock:
            for a in self._arrays:
                a[:, slots, :] = 0.0
        for c in self.columns.values():
            c[slots] = 0
        self._free[self._top : self._top + n] = slots
        self._top += n
        self._used -= n
        if self._used <= self._shrink_at and self.capacity > self.initial:
            self._shrink()
        elif n > 4096:
            trim_heap()

    def _grown(self) -> int:
        old = self.capacity
        if old >= self.cap:
            raise ResourceExhausted(
                f"session pool full: {self.cap} live sessions on this model version (the cap); "
                "close idle sessions or raise GATECAST_MAX_SESSIONS"
            )
        return min(self.cap, old * 2)

    def _shrink(self) -> None:
        used = np.flatnonzero(self.columns["flags"] & USED)
        need = max(self.initial, 2 * self._used, int(used[-1]) + 1 if used.size else 0)
        new = self.capacity
        while new // 2 >= need:
            new //= 2
        if new < self.capacity:
            self._resize(new)
        else:  # a high slot is still in use: look again when half as many are left (O(capacity) each time)
            self._shrink_at = self._used // 2

    def _resize(self, new: int) -> None:
        """Copies states and columns into arrays of `new` slots (every used slot is below `new`); the free
        slots below the highest used one go on the stack, lowest on top, so the lowest is handed out first."""
        keep = min(new, self.capacity)

        def resized(a: np.ndarray, axis: int) -> np.ndarray:
            shape = list(a.shape)
            shape[axis] = new
            b = np.zeros(shape, a.dtype)  # calloc: pages beyond `keep` are not resident until written
            index = (slice(None),) * axis + (slice(0, keep),)
            b[index] = a[index]
            return b

        with self._lock:  # the worker may be scattering: copy and swap in one hold, or its write is lost
            self._arrays = [resized(a, 1) for a in self._arrays]
        self.columns = {k: resized(c, 0) for k, c in self.columns.items()}
        used = self.columns["flags"] & USED
        used_slots = np.flatnonzero(used)
        self._fresh = int(used_slots[-1]) + 1 if used_slots.size else 0
        holes = np.flatnonzero(used[: self._fresh] == 0)[::-1].astype(np.int32)
        del used, used_slots
        self._free = np.zeros(new, np.int32)
        self._free[: holes.size] = holes
        self._top = int(holes.size)
        self._shrink_at = new // 4
        trim_heap()

    def gather(self, slots: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            return [a.take(slots, axis=1) for a in self._arrays]  # take: about half the time of a[:, slots, :]

    def scatter(self, slots: np.ndarray, states: list[np.ndarray]) -> None:
        with self._lock:
            for a, s in zip(self._arrays, states, strict=True):
                a[:, slots, :] = s
