"""How the tasks of a SLURM job deal out one conversion (the shared run itself is exercised on
the real cluster in test_slurm.py), and what a task does only on SLURM."""

from __future__ import annotations

import multiprocessing
import random
import shutil
from pathlib import Path

import pytest

from converter import job
from converter.tasks import SlurmInfo, TaskGroup
from tests.conftest import TINY, model_overrides


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


def _task(rank: int, step: int, overrides: list[str], folder: str, said) -> None:
    """One task of a two-task conversion, as job.run runs it, with the step it resolved."""
    from converter.config import to_object
    from converter.conversion import convert
    from converter.errors import ConversionError
    from converter.sources import open_storage
    from converter.sources.steps import find_step_dir
    from tests.conftest import compose

    conf = to_object(compose(overrides))
    group = TaskGroup(rank=rank, count=2, run_id="7.0", folder=Path(folder))
    try:
        with group.running(), open_storage(conf.experiment.checkpoint_dir, {}) as storage:
            found, step_dir = find_step_dir(storage, step)
            convert(conf, storage, found, step_dir, None, group)
        said.put((rank, "converted"))
    except ConversionError as e:
        said.put((rank, str(e)))


def test_tasks_that_resolved_different_steps_fail_the_conversion(tiny_checkpoint, tmp_path):
    """Each task finds the step and lists its files itself: a save that finished between two
    tasks' listings (here, task 1 taking step 7 where task 0 took step 5) must not mix two
    saves in one output. Two real processes, talking as a SLURM job's tasks do."""
    root = tmp_path / "checkpoint"
    root.mkdir()
    (root / "step-5").symlink_to(tiny_checkpoint / "step-5")
    shutil.copytree(tiny_checkpoint / "step-5", root / "step-7")
    out = tmp_path / "out" / "model.pt"
    overrides = [
        "experiment=debug",
        f"experiment.checkpoint_dir={root}",
        f"experiment.output={out}",
        *model_overrides(TINY),
    ]
    context = multiprocessing.get_context("spawn")
    said = context.Queue()
    tasks = [
        context.Process(target=_task, args=(rank, step, overrides, str(tmp_path / "tasks"), said))
        for rank, step in ((0, 5), (1, 7))
    ]
    for task in tasks:
        task.start()
    answers = dict(said.get(timeout=300) for _ in tasks)
    for task in tasks:
        task.join(timeout=60)
    assert "task 1 of 2 planned from another source or other settings than task 0" in answers[1]
    assert "step_dir" in answers[1] and f"this task {root / 'step-7'}" in answers[1]
    assert answers[0].startswith("Task 1 of 2 of this SLURM job failed its share"), answers[0]
    assert not out.parent.exists() or not list(out.parent.iterdir())
