"""titan2tune's launchers for ``hydra/launcher=slurm`` (and ``slurm_gpu``): those of
hydra-submitit-launcher, except that a sweep waits for every job.

hydra-submitit-launcher takes the jobs' results in order and raises at the first job that
ended without one: killed for its memory or time, its node lost, or a Python environment that
could not start there. The sweep then ended with submitit's traceback and no summary, while
the jobs after it still ran. Here every job is awaited; one that left no result is said in
one paragraph (its SLURM state, what submitit read, its log), and the sweep goes on to its
summary (``converter.summary``), which lists the jobs without a result and fails the sweep.

The jobs themselves run as hydra-submitit-launcher runs them (its ``__call__``): only how the
launching process submits and collects them is this module's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

log = logging.getLogger("titan2tune")

# Settings for submitit's executor itself; the others are the cluster's job parameters.
_EXECUTOR_SETTINGS = ("submitit_folder", "max_num_timeout")


class _AwaitingEveryJob(BaseSubmititLauncher):
    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit  # as hydra-submitit-launcher: only a sweep that launches pays for it

        assert self.config is not None, "Hydra calls setup() before launch()"
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, int(str(self.config.hydra.sweep.mode), 8))
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]},
        )
        queue = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                key if key in queue else f"{self._EXECUTOR}_{key}": value
                for key, value in self.params.items()
                if key not in _EXECUTOR_SETTINGS
            }
        )
        nums = range(initial_job_idx, initial_job_idx + len(job_overrides))
        log.info("Submitting %d jobs (%s); the sweep's folder: %s", len(nums), self._EXECUTOR,
                 sweep_dir)  # fmt: skip
        for num, overrides in zip(nums, job_overrides, strict=True):
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        # The arguments of BaseSubmititLauncher.__call__, one list per argument.
        jobs = executor.map_array(
            self,
            [list(o) for o in job_overrides],
            ["hydra.sweep.dir"] * len(nums),
            list(nums),
            [f"job_id_for_{num}" for num in nums],
            [Singleton.get_state()] * len(nums),
        )
        return [
            self._outcome(job, num, overrides)
            for job, num, overrides in zip(jobs, nums, job_overrides, strict=True)
        ]

    @staticmethod
    def _outcome(job: Any, num: int, overrides: Sequence[str]) -> JobReturn:
        """The job's own return, once it has ended; for a job that left none, an empty one
        that the sweeper takes as done (a failed one would end the sweep there), and the
        reason in the log."""
        failure = job.exception()  # waits for the job's end
        if failure is None:
            return job.results()[0]
        said = _reason(failure, job.stderr() or "")
        log.error(
            "Job %d (%s) ended without a result: SLURM job %s, state %s; %s. Its log: %s. It "
            "was stopped outside the conversion (memory or time limit, a lost node, scancel), "
            "or its Python environment failed to start there: the log says which.",
            num,
            " ".join(filter_overrides(overrides)) or "no overrides",
            job.job_id,
            job.state,
            said,
            job.paths.stderr,
        )
        return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)


def _reason(failure: Exception, log_text: str) -> str:
    """What ended a job, in a line: for a job whose Python raised, the last line of the trace
    that submitit's error quotes between two rules (an ImportError, say); otherwise the last
    line of its log (slurmstepd's out-of-memory or time-limit message), or submitit's own
    first line where there is no log."""
    from submitit.core.utils import FailedJobError

    if isinstance(failure, FailedJobError):
        parts = str(failure).split("-" * 22)
        if len(parts) >= 3 and (line := _last_line(parts[1])):
            return line
    return _last_line(log_text) or str(failure).strip().splitlines()[0]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class SlurmLauncher(_AwaitingEveryJob):
    _EXECUTOR = "slurm"
