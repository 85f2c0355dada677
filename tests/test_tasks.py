"""How the tasks of a SLURM job deal out one conversion (the shared run itself is exercised on
the real cluster in test_slurm.py), and what a task does only on SLURM."""

from __future__ import annotations

import random

import pytest

from converter import job
from converter.tasks import SlurmInfo, TaskGroup


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_every_item_goes_to_exactly_one_task_in_balanced_shares(count):
    rng = random.Random(count)
    sizes = {f"layers.{i}.w{j}": rng.randint(1, 10**9) for i in range(40) for j in range(3)}
    shares = [TaskGroup(rank=r, count=count).share_of(sizes) for r in range(count)]
    dealt = [item for share in shares for item in share]
    assert sorted(dealt) == sorted(sizes)  # all of them, none twice
    loads = [sum(sizes[k] for k in share) for share in shares]
    # Largest first to the least loaded: no task exceeds another by more than one item.
    assert max(loads) - min(loads) <= max(sizes.values())
    # Every task computes the same deal.
    assert shares == [TaskGroup(rank=r, count=count).share_of(dict(sizes)) for r in range(count)]


def test_a_lone_task_takes_everything_and_talks_to_no_one(tmp_path):
    group = TaskGroup()
    sizes = {"a": 3, "b": 5}
    assert group.lead and not group.shared
    assert sorted(group.share_of(sizes)) == ["a", "b"]
    group.announce({"status": "fill"})  # no folder, no files
    assert not group.announced and group.answers() == {}


@pytest.mark.parametrize("cluster, renamed", [("slurm", True), ("local", False)])
def test_only_a_slurm_job_renames_itself(monkeypatch, cluster, renamed):
    """A sweep's SLURM job renames itself for its experiment (on the real cluster in
    test_slurm.py); a local submitit job has no SLURM job, and an scontrol without a controller
    would hold the task for seconds before it fails."""
    calls = []
    monkeypatch.setattr(job.subprocess, "run", lambda argv, **_: calls.append(argv))
    info = SlurmInfo(cluster, "42", "node", "out", "err", task=0, tasks=2, restart=0)
    job._name_slurm_job(info, "debug")
    expected = [["scontrol", "update", "JobId=42", "JobName=titan2tune:debug"]]
    assert calls == (expected if renamed else [])
