"""The state pool: one preallocated array per state tensor, a slot per session.

Arrays are laid out [dim0, slots, dim1] so that gathering a batch's states is one fancy-indexed read
that already has the graph's [dim0, batch, dim1] shape, and scattering is one indexed write. The pool
grows by doubling up to its cap. A lock makes grow/gather/scatter safe between the event loop (which
acquires and releases slots) and the worker thread (which gathers and scatters).
"""

from __future__ import annotations

import threading

import numpy as np

from gatecast.manifest import StateSpec

from .errors import ResourceExhausted


class StatePool:
    def __init__(self, specs: list[StateSpec], initial: int, cap: int) -> None:
        self.specs = specs
        self.cap = cap
        self._lock = threading.Lock()
        size = max(1, min(initial, cap))
        self._arrays = [np.zeros((s.dims[0], size, s.dims[1]), np.float32) for s in specs]
        self._free = list(range(size - 1, -1, -1))  # a stack: low slots first
        self._used = 0

    @property
    def capacity(self) -> int:
        return self._arrays[0].shape[1]

    @property
    def used(self) -> int:
        return self._used

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self._used += 1
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            for a in self._arrays:
                a[:, slot, :] = 0.0
            self._free.append(slot)
            self._used -= 1

    def _grow(self) -> None:
        old = self.capacity
        if old >= self.cap:
            raise ResourceExhausted(
                f"session pool full: {self.cap} live sessions on this model version (the cap); "
                "close idle sessions or raise GATECAST_MAX_SESSIONS"
            )
        new = min(self.cap, old * 2)
        grown = []
        for a in self._arrays:
            b = np.zeros((a.shape[0], new, a.shape[2]), np.float32)
            b[:, :old, :] = a
            grown.append(b)
        self._arrays = grown
        self._free.extend(range(new - 1, old - 1, -1))

    def gather(self, slots: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            return [a[:, slots, :] for a in self._arrays]

    def scatter(self, slots: np.ndarray, states: list[np.ndarray]) -> None:
        with self._lock:
            for a, s in zip(self._arrays, states, strict=True):
                a[:, slots, :] = s
