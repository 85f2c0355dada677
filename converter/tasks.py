"""One conversion shared by the tasks of a SLURM job (``hydra.launcher.tasks_per_node``/``nodes``).

srun starts the Hydra job in every task of the job, and submitit tells each its rank. Task 0,
the lead, does all that a lone run does: it takes the output's lock, plans, skips an output that
is up to date, writes the file's structure, reads the finished file back, writes the manifest
and publishes. What costs time is shared: the source tensors, and the source files to hash, are
dealt out by size, and every task fills its share of tensors into the lead's partial file on the
shared filesystem. The file-structure-first design is what allows it: the tensors' byte ranges
are known before any is written, and they are disjoint.

The tasks talk through small JSON files in a folder of the sweep's named for the job's number
(shared by its tasks, and by no other job), named for the run (SLURM job id and restart
count), so that nothing left by an earlier, requeued attempt passes for this one's. The lead
announces exactly once (fill this partial file at these offsets; or skipped; or failed), and
later may ask the others to stop; every other task answers exactly once (the regions it wrote
and their digests, and the hashes it took; or its error; or that it saw the announcement).
The lead waits for every answer before it removes the folder. A task that dies outright is not
waited for forever: the SLURM profiles export SLURM_KILL_BAD_EXIT=1, so srun then ends every
task of the job.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.errors import ConversionError
from converter.publish import write_atomic

log = logging.getLogger("titan2tune")

_POLL_S = 0.2


@dataclass(frozen=True)
class SlurmInfo:
    """Where a submitit job runs (on SLURM, or locally): its id, its task among the job's
    tasks, its logs."""

    cluster: str  # submitit's executor: "slurm"; "local" or "debug" (this machine, no SLURM)
    job_id: str
    hostname: str
    stdout: str
    stderr: str
    task: int
    tasks: int
    restart: int  # a requeued job keeps its id; this tells its attempts apart

    @property
    def on_slurm(self) -> bool:
        """A SLURM job (a local submitit job's id is a process id, with no job to name)."""
        return self.cluster == "slurm"


@dataclass(frozen=True)
class TaskGroup:
    """This task's place in its job: ``rank`` of ``count`` tasks, and where they talk."""

    rank: int = 0
    count: int = 1
    run_id: str = ""
    folder: Path | None = None

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def shared(self) -> bool:
        return self.count > 1

    def __str__(self) -> str:
        return f"task {self.rank} of {self.count}"

    def share_of(self, sizes: Mapping[Any, int]) -> list[Any]:
        """This task's items of ``sizes`` (item -> bytes): the largest first, each to the task
        with the fewest bytes so far. Every task computes the same deal from the same input."""
        load = [0] * self.count
        mine = []
        for item in sorted(sizes, key=lambda k: (-sizes[k], str(k))):
            task = load.index(min(load))
            load[task] += sizes[item]
            if task == self.rank:
                mine.append(item)
        return mine

    @contextmanager
    def running(self) -> Iterator[None]:
        """Around a task's whole job, so that no task waits for one that failed: on failure,
        the lead announces it (or, once the others fill, asks them to stop) and waits for all
        answers; another task answers with its error. At the end the lead removes the folder."""
        try:
            yield
        except BaseException as e:
            if self.shared and self.lead:
                if not self.announced:
                    self.announce({"status": "failed"})
                else:
                    self.stop_others()
                self.answers()  # every task has let go of the partial file
            elif self.shared:
                self.answer({"error": str(e)})
            raise
        finally:
            if self.shared and self.lead:
                self.close()

    # ------------------------------------------------------------------ the lead (task 0)

    def announce(self, message: dict[str, Any]) -> None:
        """Tells the other tasks what to do: ``status`` fill (with the partial file and the
        offsets of its tensors), skipped, or failed."""
        if self.shared:
            self._folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path("lead"), json.dumps(message))

    @property
    def announced(self) -> bool:
        return self.shared and self._path("lead").exists()

    def stop_others(self) -> None:
        """Asks the tasks filling the file to stop after their current part (the lead failed)."""
        write_atomic(self._path("stop"), "")

    def answers(self) -> dict[int, dict[str, Any]]:
        """Every other task's answer, once all have answered."""
        waiting = set(range(1, self.count))
        answers = {}
        while waiting:
            for rank in sorted(waiting):
                path = self._path(f"task-{rank}")
                if path.exists():
                    answers[rank] = json.loads(path.read_text())
                    waiting.discard(rank)
            if waiting:
                time.sleep(_POLL_S)
        return answers

    def close(self) -> None:
        """Removes the folder the tasks talked in (the lead, once all have answered)."""
        shutil.rmtree(self._folder, ignore_errors=True)

    def clear_earlier_runs(self) -> None:
        """Removes what an earlier attempt of this job left (the lead, before announcing)."""
        if self.shared and self._folder.exists():
            for path in self._folder.iterdir():
                if not path.name.startswith(f"{self.run_id}."):
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the other tasks

    def instructions(self) -> dict[str, Any]:
        """What the lead announced, once it has."""
        path = self._path("lead")
        log.info("%s: waiting for task 0 to plan and to create the output.", self)
        while not path.exists():
            time.sleep(_POLL_S)
        return json.loads(path.read_text())

    def stopped(self) -> bool:
        """True once the lead has asked the tasks to stop."""
        return self._path("stop").exists()

    def answer(self, message: dict[str, Any]) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path(f"task-{self.rank}"), json.dumps(message))

    # ------------------------------------------------------------------

    @property
    def _folder(self) -> Path:
        assert self.folder is not None, "a shared conversion needs a folder to talk in"
        return self.folder

    def _path(self, what: str) -> Path:
        return self._folder / f"{self.run_id}.{what}.json"


def check_answers(answers: Mapping[int, Mapping[str, Any]], group: TaskGroup) -> None:
    """Fails the conversion if another task failed its share."""
    for rank, answer in sorted(answers.items()):
        if answer.get("error"):
            raise ConversionError(
                f"Task {rank} of {group.count} of this SLURM job failed its share of the "
                f"conversion: {answer['error']} Its log is the job's log for task {rank} "
                "(submitit's <job id>_<rank>_log.err)."
            )
