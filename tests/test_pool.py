"""The state pool: slots, growth up to the cap, one indexed gather and scatter, zeroed on release."""

from __future__ import annotations

import numpy as np
import pytest

from gatecast.manifest import StateSpec
from gatecast.service.errors import ResourceExhausted
from gatecast.service.pool import StatePool

SPECS = [StateSpec(input="h0", output="hn", dims=(2, 3)), StateSpec(input="c0", output="cn", dims=(2, 3))]


def test_gather_scatter_round_trip_and_growth() -> None:
    pool = StatePool(SPECS, initial=2, cap=5)
    slots = [pool.acquire() for _ in range(5)]
    assert sorted(slots) == [0, 1, 2, 3, 4] and pool.capacity == 5 and pool.used == 5
    with pytest.raises(ResourceExhausted, match="5 live sessions"):
        pool.acquire()
    idx = np.array([4, 1])
    h = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    pool.scatter(idx, [h, -h])
    got = pool.gather(idx)
    np.testing.assert_array_equal(got[0], h)
    np.testing.assert_array_equal(got[1], -h)
    np.testing.assert_array_equal(pool.gather(np.array([0]))[0], 0)  # other slots untouched
    pool.release(4)
    assert pool.used == 4
    again = pool.acquire()
    assert again == 4
    np.testing.assert_array_equal(pool.gather(np.array([again]))[0], 0)  # a reused slot starts from zero
