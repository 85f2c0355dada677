"""The buffer pool that bounds conversion memory: never more than the budget is allocated,
except for one request larger than the whole budget, which then runs alone."""

from __future__ import annotations

import random
import threading

from converter.engine import BufferPool


def test_pool_stays_within_budget_under_concurrent_use():
    pool, budget = BufferPool(100), 100
    observed: list[tuple[int, int]] = []  # (bytes allocated, buffers in use) while borrowing
    lock = threading.Lock()

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            n = rng.choice([5, 17, 40, 60, 130])
            buffer = pool.borrow(n)
            assert buffer.numel() >= n
            with lock:
                observed.append((pool._allocated, pool._in_use, n))
            pool.give_back(buffer)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(observed) == 1200
    for allocated, in_use, n in observed:
        if n > budget:
            assert in_use == 1 and allocated <= n  # the oversized request ran alone
        else:
            assert allocated <= budget or in_use == 1


def test_pool_reuses_buffers():
    pool = BufferPool(1 << 20)
    first = pool.borrow(1000)
    pool.give_back(first)
    again = pool.borrow(800)
    assert again is first
