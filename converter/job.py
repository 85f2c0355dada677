"""The Hydra job: convert one experiment's checkpoint and report how it went.

The composed DictConfig becomes the typed config here, once; below the job, only dataclasses
and enums travel.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from converter.config import RESOLVED_STEPS, ConvertConfig, local_path, to_object
from converter.conversion import Status, convert
from converter.errors import ConversionError
from converter.publish import write_atomic
from converter.sources import open_storage
from converter.sources.steps import find_step_dir
from converter.tasks import SlurmInfo, TaskGroup

log = logging.getLogger("titan2tune")


def status_dir(sweep_dir: str | Path) -> Path:
    """Where a sweep's jobs leave their results, one ``<hydra.job.num>.json`` each."""
    return Path(sweep_dir) / "titan2tune_status"


@dataclass
class JobResult:
    """One experiment's outcome, as the end-of-sweep summary shows it."""

    experiment: str
    status: Status
    output: str = ""
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    slurm_job_id: str = ""
    log_path: str = ""
    step: int | None = None  # the step converted (step=latest resolved)
    warnings: list[str] = field(default_factory=list)  # what the log warned of, for the summary

    @property
    def ok(self) -> bool:
        return self.status is not Status.failed

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "status": self.status.value}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> JobResult:
        fields = json.loads(text)
        return cls(**{**fields, "status": Status(fields["status"])})


def run(cfg: DictConfig) -> JobResult:
    """Runs one conversion; never raises for bad input, it reports it in the result."""
    start = time.perf_counter()
    RESOLVED_STEPS.clear()  # before any setting is resolved: the job's own steps
    name = str(cfg.experiment.get("name", "?"))
    slurm = _slurm_info()
    _name_slurm_job(slurm, name)
    group = _task_group(slurm)
    result = JobResult(name, Status.failed, **_environment(slurm))
    warnings = _WarningsKept(result.warnings)
    logging.getLogger().addHandler(warnings)
    try:
        with group.running():
            conf = _checked(cfg)
            result.output = str(local_path(conf.experiment.output).resolve())
            exp = conf.experiment
            storage_at = (exp.checkpoint_dir, exp.storage_options, exp.storage_retry_s)
            with open_storage(*storage_at) as storage:
                asked = (str(exp.checkpoint_dir), str(exp.step))
                step, step_dir = find_step_dir(storage, RESOLVED_STEPS.get(asked, exp.step))
                result.step = step
                result.status, result.bytes = convert(conf, storage, step, step_dir, slurm, group)
    except ConversionError as e:
        _reraise_interruption(e)
        result.error = str(e)
        log.error("%s: %s", name, e, exc_info=_show_tracebacks(cfg))
    except Exception as e:  # a bug, not bad input: keep the traceback
        _reraise_interruption(e)
        result.error = f"{type(e).__name__}: {e}"
        log.exception("%s: conversion failed unexpectedly", name)
    finally:
        logging.getLogger().removeHandler(warnings)
    result.seconds = round(time.perf_counter() - start, 2)
    if group.lead:  # the job's result: the sweep summary reads it
        _write_status(result)
    return result


class _WarningsKept(logging.Handler):
    """Keeps the job's warnings (an unfinished newer save passed over, head counts the
    weights cannot confirm) for its result, so that the sweep summary repeats them."""

    def __init__(self, kept: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.kept = kept

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING and record.name.startswith(("converter", "titan")):
            self.kept.append(record.getMessage())


def _reraise_interruption(e: BaseException) -> None:
    """An error raised while the job was being stopped (submitit's preemption handler raises
    SystemExit, and torch may turn it into another error on its way out) is the interruption,
    not a failed conversion: re-raise it so no failure is reported for a job being requeued."""
    for seen in _chain(e):
        if isinstance(seen, SystemExit | KeyboardInterrupt):
            raise seen


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the errors it was raised from or while handling, innermost last."""
    seen: BaseException | None = e
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _show_tracebacks(cfg: DictConfig) -> bool:
    """``debug=true``, or Hydra's own switch for full tracebacks, HYDRA_FULL_ERROR=1."""
    return bool(cfg.get("debug", False)) or os.environ.get("HYDRA_FULL_ERROR") == "1"


def _checked(cfg: DictConfig) -> ConvertConfig:
    _check_launcher()
    _check_choices_unambiguous()
    try:
        return to_object(cfg)
    except InterpolationResolutionError as e:
        # ${resolved_step:} found no step: OmegaConf wraps that error once per level of
        # interpolation, by cause or by context.
        for cause in _chain(e):
            if isinstance(cause, ConversionError):
                raise cause from None
        raise ConversionError(f"Invalid configuration: {e}.") from e
    except MissingMandatoryValue as e:
        key = e.full_key
        raise ConversionError(
            f"{key} is required, but {_experiment_file()} does not set it: add "
            f"'{key.rsplit('.', 1)[-1]}: ...' there, or give it on the command line ({key}=...)."
        ) from e
    except ValueError as e:
        raise ConversionError(f"Invalid configuration: {e}.") from e


def _experiment_file() -> str:
    """The YAML file the chosen experiment was read from, as a user would look for it."""
    if not HydraConfig.initialized():
        return "the experiment's config"
    choice = HydraConfig.get().runtime.choices.get("experiment")
    return next(iter(_option_files("experiment", choice)), f"experiment/{choice}.yaml")


def _option_files(group: str, option: str) -> list[str]:
    """The files on Hydra's search path that define ``option`` of config group ``group``,
    in the order Hydra searches them: it reads the first."""
    found: dict[str, str] = {}  # one file reached twice (--config-dir conf) is one
    for source in HydraConfig.get().runtime.config_sources:
        path = Path(source.path) / group / f"{option}.yaml"
        if source.schema == "file" and path.is_file():
            found.setdefault(os.path.realpath(path), str(path))
    return list(found.values())


def _check_choices_unambiguous() -> None:
    """An experiment (or model preset, launcher profile) in a --config-dir folder that has the
    name of one in conf/ is not read: Hydra searches conf/ first, and the job would convert
    the checkpoint the other file names."""
    if not HydraConfig.initialized():
        return
    for group, option in HydraConfig.get().runtime.choices.items():
        if isinstance(option, str) and len(files := _option_files(group, option)) > 1:
            renamed = Path(files[-1]).with_stem(f"my_{Path(option).name}")
            raise ConversionError(
                f"{group}={option} is defined by {len(files)} files: {', '.join(files)}. "
                "Hydra reads the first and ignores the others. Give yours another name (copy "
                f"it to {renamed}) and choose that."
            )


def _check_launcher() -> None:
    """Hydra uses a launcher only in a multirun: without ``-m``, ``hydra/launcher=slurm`` would
    convert here, on the login node, and submit nothing."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    target = str(hc.launcher.get("_target_", ""))
    if hc.mode == RunMode.RUN and "BasicLauncher" not in target:
        raise ConversionError(
            f"A launcher is chosen ({target.rsplit('.', 1)[-1]}), but Hydra runs a launcher only "
            "in a multirun: add -m (python convert.py -m ...) to submit the job; without it the "
            "conversion would run here and submit nothing."
        )


def _environment(slurm: SlurmInfo | None) -> dict[str, str]:
    """Where this job runs and logs, for the summary."""
    env: dict[str, str] = {}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        env["log_path"] = str(Path(hc.runtime.output_dir) / f"{hc.job.name}.log")
    if slurm:
        if slurm.on_slurm:
            env["slurm_job_id"] = slurm.job_id
        env["log_path"] = slurm.stderr
    return env


def _slurm_info() -> SlurmInfo | None:
    # submitit marks its jobs with these; outside one, skip importing it.
    if not {"SUBMITIT_EXECUTOR", "SUBMITIT_DEBUG_JOB_ID"} & os.environ.keys():
        return None
    import submitit

    try:
        job = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return None
    paths = job.paths
    return SlurmInfo(
        cluster=job.cluster,
        job_id=str(job.job_id),
        hostname=job.hostname,
        stdout=str(paths.stdout).replace("%t", str(job.global_rank)),
        stderr=str(paths.stderr).replace("%t", str(job.global_rank)),
        task=job.global_rank,
        tasks=job.num_tasks,
        restart=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    )


def _name_slurm_job(slurm: SlurmInfo | None, experiment: str) -> None:
    """A sweep is one SLURM job array, all of whose elements carry the launcher's one job name;
    each element renames itself for its experiment, so that squeue and sacct tell them apart.
    Best effort: a cluster that refuses it only keeps the array's name. A local submitit job
    has no SLURM job to rename (and an scontrol with no controller to answer retries for
    seconds)."""
    if slurm is None or not slurm.on_slurm or slurm.task != 0:
        return
    name = f"titan2tune:{experiment}"
    try:
        subprocess.run(
            ["scontrol", "update", f"JobId={slurm.job_id}", f"JobName={name}"],
            capture_output=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("Could not rename SLURM job %s to %s: %s", slurm.job_id, name, e)


def _task_group(slurm: SlurmInfo | None) -> TaskGroup:
    """This job's place among the tasks of its SLURM job (a lone task outside SLURM)."""
    if not slurm or slurm.tasks == 1 or not HydraConfig.initialized():
        return TaskGroup()
    return TaskGroup(
        rank=slurm.task,
        count=slurm.tasks,
        run_id=f"{slurm.job_id}.{slurm.restart}",
        # Shared by the job's tasks, and by no other job: named for the job's number, not its
        # output folder, which hydra.sweep.subdir may give two jobs.
        folder=_sweep_dir() / "titan2tune_tasks" / str(HydraConfig.get().job.num),
    )


def _sweep_dir() -> Path:
    """The sweep's folder, absolute: a job may run in a folder of its own (hydra.job.chdir)."""
    return Path(to_absolute_path(HydraConfig.get().sweep.dir))


def _write_status(result: JobResult) -> None:
    """Leaves a sweep job's result where the sweep summary finds it."""
    if HydraConfig.initialized() and (hc := HydraConfig.get()).mode == RunMode.MULTIRUN:
        folder = status_dir(_sweep_dir())
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{hc.job.num}.json", result.to_json())
