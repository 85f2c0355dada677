"""The sweep's callbacks: a check of the planned jobs before any runs, and the end-of-sweep
summary, one table for every experiment and a failing exit if any failed.

Each job leaves its result as a small JSON file in the sweep folder, named for its job number
(written on the compute node, when the sweep runs on SLURM): not in its own output folder,
which ``hydra.sweep.subdir`` may give two jobs. This callback runs in the launching process
after all jobs have ended, reads them back from the shared sweep folder and prints them in the
order of the jobs.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from converter.config import local_path
from converter.job import JobResult, status_dir

log = logging.getLogger("titan2tune")


def format_table(results: dict[int, JobResult], jobs: list[list[str]]) -> str:
    """One row per job (by its number) that left a result; the last column says which job it
    is: its number (its folder's prefix) and the overrides that tell it from the others."""
    rows = [("experiment", "status", "step", "output", "size", "seconds", "job")]
    varied = _varied(jobs)
    for n, r in results.items():
        step = "-" if r.step is None else str(r.step)
        job = " ".join([str(n), *(varied[n] if n < len(varied) else [])])
        rows.append(
            (r.experiment, str(r.status), step, r.output or "-", _size(r.bytes),
             f"{r.seconds:.1f}", job)
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for n, r in results.items():
        for warning in dict.fromkeys(r.warnings):  # once each, in order
            said = warning.removeprefix(r.experiment + ": ")
            lines.append(f"\n{r.experiment} (job {n}) warning: {said}")
        if not r.ok:
            where = f"SLURM job {r.slurm_job_id}, " if r.slurm_job_id else ""
            lines.append(
                f"\n{r.experiment} (job {n}) failed ({where}log {r.log_path or '-'}):\n  {r.error}"
            )
    return "\n".join(lines)


def _varied(jobs: list[list[str]]) -> list[list[str]]:
    """Each job's overrides that not every job shares: the swept values."""
    shared = set.intersection(*(set(job) for job in jobs)) if jobs else set()
    return [[o for o in job if o not in shared] for job in jobs]


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n else "-"


def planned_jobs(config: DictConfig) -> list[list[str]]:
    """The overrides of each job of the sweep, as Hydra's basic sweeper makes them: its
    ``params`` (``hydra.sweeper.params``, from a config file) first, then the command line's.
    The config loader lets the parser expand ``glob(...)`` over a config group's options."""
    # Unresolved: an override's value may hold an interpolation, e.g. ${experiment.name}.
    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    overrides = parser.parse_overrides([*(f"{k}={v}" for k, v in params.items()), *task])
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def planned_outputs(config: DictConfig) -> dict[str, list[str]]:
    """Every output path the sweep's jobs resolve to -> the jobs (their overrides) that write
    it, composed as the sweeper composes them, before any job runs."""
    loader = GlobalHydra.instance().config_loader()
    outputs: dict[str, list[str]] = {}
    launching = HydraConfig.instance().cfg
    try:
        for num, job in enumerate(planned_jobs(config)):
            try:
                cfg = loader.load_sweep_config(config, job)
            except (HydraException, OmegaConfBaseException):
                continue  # it does not compose (a misspelt experiment, a bad value): Hydra says
            try:
                cfg = _as_launched(cfg, num)
                if cfg.dry_run:  # writes nothing
                    continue
                output = str(local_path(cfg.experiment.output).resolve())
            except (HydraException, OmegaConfBaseException) as e:
                log.warning(
                    "The output of job %d (%s) cannot be resolved before the sweep runs (%s): "
                    "it is not checked against the other jobs' outputs.",
                    num,
                    " ".join(job) or "no overrides",
                    " ".join(str(e).split()),
                )
                continue
            outputs.setdefault(output, []).append(" ".join(job) or "(no overrides)")
    finally:
        HydraConfig.instance().cfg = launching
    return outputs


def _as_launched(cfg: DictConfig, num: int) -> DictConfig:
    """A job's config as its launcher and ``run_job`` hand it to the job: numbered, set as
    the HydraConfig that ``${hydra:...}`` reads (an output path may name
    ``runtime.choices.experiment``, say, and the job's folder may too), then given its folder.
    Its id is its number here: SLURM's, given at submission, is as unique."""
    with open_dict(cfg):
        cfg.hydra.job.num = num
        cfg.hydra.job.id = str(num)
    HydraConfig.instance().set_config(cfg)
    folder = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
    with read_write(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(folder.absolute())
    HydraConfig.instance().set_config(cfg)
    return cfg


def nested_outputs(outputs: Collection[str]) -> list[tuple[str, str]]:
    """``(inner, outer)`` for each output that lies inside another (a folder output)."""
    paths = sorted(map(Path, outputs))
    return [
        (str(inner), str(outer))
        for i, outer in enumerate(paths)
        for inner in paths[i + 1 :]
        if inner.is_relative_to(outer)
    ]


class _OnceEach(logging.Filter):
    """Lets the first record of a kind through, and drops the ones that repeat it: submitit
    warns that sacct failed on every poll of a cluster without accounting."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.marker not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _fails_the_sweep(callback: Callable[..., None]) -> Callable[..., None]:
    """Hydra turns an error raised in a callback into a warning and goes on: the sweep would
    then run unchecked, or end with exit 0 whatever its jobs did. Any error fails it."""

    @functools.wraps(callback)
    def wrapped(*args: Any, **kwargs: Any) -> None:
        try:
            callback(*args, **kwargs)
        except Exception as e:
            log.error(
                "The sweep's %s failed, a bug of titan2tune's: %s: %s. Please report it.",
                callback.__name__,
                type(e).__name__,
                e,
            )
            sys.exit(1)

    return wrapped


class SweepSummary(Callback):
    """Refuses a sweep whose jobs would write the same output; prints the summary table at the
    end of a multirun and exits 1 if any experiment failed or left no result."""

    @_fails_the_sweep
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        logging.getLogger("submitit").addFilter(_OnceEach("Bypassing sacct error"))
        outputs = planned_outputs(config)
        clashes = {out: jobs for out, jobs in outputs.items() if len(jobs) > 1}
        if clashes:
            described = "; ".join(f"{out} by [{'], ['.join(j)}]" for out, j in clashes.items())
            log.error(
                "Jobs of this sweep would write the same output, each replacing the last: %s. "
                "Nothing was run. Give each job its own experiment.output: put what the jobs "
                "differ in into the path, e.g. ${experiment.name}, ${resolved_step:} or "
                "${output_format.name}.",
                described,
            )
            sys.exit(1)
        if nested := nested_outputs(outputs):
            described = "; ".join(
                f"{inner} by [{'], ['.join(outputs[inner])}] inside {outer} by "
                f"[{'], ['.join(outputs[outer])}]"
                for inner, outer in nested
            )
            log.error(
                "Jobs of this sweep would write an output inside another's: %s. The outer "
                "folder would then hold files its manifest does not list, and replacing it "
                "would delete the inner one. Nothing was run. Give each job an output outside "
                "the others'.",
                described,
            )
            sys.exit(1)
        # A sweep folder given again (hydra.sweep.dir) holds the last sweep's results: only
        # this sweep's jobs may be summed up.
        for stale in status_dir(config.hydra.sweep.dir).glob("*.json"):
            stale.unlink()

    @_fails_the_sweep
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        found = status_dir(sweep_dir).glob("*.json")
        results = {int(p.stem): JobResult.from_json(p.read_text()) for p in found}
        if not results:
            log.error("No job of this sweep reported a result (sweep folder %s).", sweep_dir)
            sys.exit(1)
        planned = planned_jobs(config)
        print("\n" + format_table(dict(sorted(results.items())), planned), flush=True)
        failed = [r.experiment for r in results.values() if not r.ok]
        if failed:
            log.error("%d of %d experiments failed: %s", len(failed), len(results), failed)
        missing = [n for n in range(len(planned)) if n not in results]
        varied = _varied(planned)
        if missing:
            log.error(
                "%d of the sweep's %d jobs reported no result (%s): killed before they ended "
                "(out of memory, or by the scheduler)? Their logs are in their job folders "
                "under %s.",
                len(missing),
                len(planned),
                "; ".join(f"job {n}: {' '.join(varied[n]) or 'no overrides'}" for n in missing),
                sweep_dir,
            )
        if failed or missing:
            sys.exit(1)
