"""The engine's worker threads and torch's own: the workers of one conversion share the
machine's intra-op threads instead of each starting a team as large as the machine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from converter.engine import threads_per_worker


def test_each_worker_gets_its_share_of_torchs_threads_and_they_are_given_back():
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # a share that shows on any machine
    try:
        with threads_per_worker(2), ThreadPoolExecutor(2) as workers:
            seen = set(workers.map(lambda _: torch.get_num_threads(), range(8)))
        assert seen == {2}
        assert torch.get_num_threads() == 4
        with threads_per_worker(8), ThreadPoolExecutor(8) as workers:
            assert set(workers.map(lambda _: torch.get_num_threads(), range(8))) == {1}
    finally:
        torch.set_num_threads(before)
