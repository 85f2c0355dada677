"""The Hydra job: convert one experiment's checkpoint, end to end, and report how it went.

Order of work, each step failing before anything is written if the input is bad:
resolve the step folder -> validate the DCP index and shard files -> plan every key -> skip if
an identical conversion is already on disk -> stream tensors into a partial file -> sync ->
verify the read-back -> publish under the final name -> write the manifest and recipe snippet.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from converter.config import ConvertConfig, to_object
from converter.engine import convert_tensors
from converter.errors import ConversionError
from converter.manifest import (
    SourceHasher,
    build_manifest,
    fingerprint,
    manifest_path,
    read_manifest,
    sha256_file,
    torchtune_snippet,
    torchtune_yaml_path,
    write_atomic,
)
from converter.mapping import plan_conversion
from converter.sink import OutputFile, output_error
from converter.source import DcpCheckpoint, find_step_dir
from converter.verify import verify_output

log = logging.getLogger("titan2tune")

STATUS_FILE = "titan2tune_status.json"


@dataclass
class JobResult:
    """One experiment's outcome, as the end-of-sweep summary shows it."""

    experiment: str
    status: str  # converted | skipped | failed
    output: str = ""
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    slurm_job_id: str = ""
    log_path: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def run(cfg: DictConfig) -> JobResult:
    """Runs one conversion; never raises for bad input, it reports it in the result."""
    start = time.perf_counter()
    name = str(cfg.experiment.get("name", "?"))
    result = JobResult(name, "failed", **_environment())
    try:
        conf = _checked(cfg)
        result = _convert(conf, cfg, result)
    except ConversionError as e:
        _reraise_interruption(e)
        result.error = str(e)
        log.error("%s: %s", name, e, exc_info=_show_tracebacks(cfg))
    except Exception as e:  # a bug, not bad input: keep the traceback
        _reraise_interruption(e)
        result.error = f"{type(e).__name__}: {e}"
        log.exception("%s: conversion failed unexpectedly", name)
    result.seconds = round(time.perf_counter() - start, 2)
    _write_status(result)
    return result


def _reraise_interruption(e: BaseException) -> None:
    """An error raised while the job was being stopped (submitit's preemption handler raises
    SystemExit, and torch may turn it into another error on its way out) is the interruption,
    not a failed conversion: re-raise it so no failure is reported for a job being requeued."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, SystemExit | KeyboardInterrupt):
            raise seen
        seen = seen.__cause__ or seen.__context__


def _show_tracebacks(cfg: DictConfig) -> bool:
    """``debug=true``, or Hydra's own switch for full tracebacks, HYDRA_FULL_ERROR=1."""
    return bool(cfg.get("debug", False)) or os.environ.get("HYDRA_FULL_ERROR") == "1"


def _checked(cfg: DictConfig) -> ConvertConfig:
    try:
        return to_object(cfg)
    except ValueError as e:
        raise ConversionError(f"Invalid configuration: {e}.") from e


def _convert(conf: ConvertConfig, cfg: DictConfig, result: JobResult) -> JobResult:
    exp = conf.experiment
    times: dict[str, float] = {}
    t = time.perf_counter()
    step, step_dir = find_step_dir(Path(to_absolute_path(exp.checkpoint_dir)), exp.step)
    checkpoint = DcpCheckpoint(step_dir)
    given = Path(to_absolute_path(exp.output))
    output = given.resolve()
    result.output = str(output)
    _check_not_source(given, output, checkpoint)
    export = exp.export_dtype.value
    fmt = conf.output_format.value
    plan = plan_conversion(
        checkpoint.tensors,
        checkpoint.byte_entries,
        exp.model,
        fmt,
        exp.export_dtype.torch_dtype,
        str(step_dir),
    )
    log.info(
        "%s: step-%d of %s, layout %s (%s checkpoint): %d tensors to write as %s/%s, "
        "%d keys left out.",
        exp.name,
        step,
        step_dir.parent,
        plan.generation,
        "weights-only" if plan.weights_only else "full training",
        len(plan.tensors),
        fmt,
        export,
        len(plan.dropped),
    )
    model_dict = OmegaConf.to_container(cfg.experiment.model, resolve=True, enum_to_str=True)
    print_ = fingerprint(checkpoint, fmt, export, model_dict)
    if _already_done(output, print_, conf.overwrite):
        log.info("%s: %s is up to date with this source and settings; skipped.", exp.name, output)
        result.status, result.bytes = "skipped", output.stat().st_size
        return result
    existed = output.exists()
    times["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    total = sum(checkpoint.tensors[k].nbytes for k in plan.sources)
    sidecars = (manifest_path(output), torchtune_yaml_path(output))
    hasher = SourceHasher([checkpoint.metadata_path, *checkpoint.shard_sizes])
    try:
        with (
            OutputFile(output, sidecars) as out,
            tqdm(total=total, unit="B", unit_scale=True, desc=exp.name, mininterval=1.0) as bar,
        ):
            # A run started at the same time may have written this very output meanwhile.
            if not existed and output.exists() and _already_done(output, print_, conf.overwrite):
                log.info("%s: %s was just written by another run; skipped.", exp.name, output)
                result.status, result.bytes = "skipped", output.stat().st_size
                return result
            out.create({t.name: (t.shape, t.dtype) for t in plan.tensors})
            regions = convert_tensors(
                checkpoint,
                plan,
                out,
                workers=conf.workers,
                budget_bytes=conf.batch_mb << 20,
                allow_nonfinite=conf.allow_nonfinite,
                progress=bar.update,
            )
            out.sync()
            times["convert"] = time.perf_counter() - t
            if conf.verify:
                t = time.perf_counter()
                verify_output(out.partial, plan, regions, checkpoint)
                times["verify"] = time.perf_counter() - t
            # Hashing the sources ran alongside; this waits only if it has not finished.
            t = time.perf_counter()
            source_sha256 = _hashes(hasher)
            times["source_sha256_wait"] = time.perf_counter() - t
            # The manifest and snippet go first: an output on disk always has its manifest.
            t = time.perf_counter()
            manifest = build_manifest(
                experiment=exp.name,
                step=step,
                checkpoint=checkpoint,
                plan=plan,
                written=out.partial,
                output=output,
                output_format=fmt,
                export_dtype=export,
                durations=times,
                config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                fingerprint=print_,
                slurm=_slurm_info(),
                source_sha256=source_sha256,
            )
            manifest["durations_s"]["manifest"] = round(time.perf_counter() - t, 3)
            try:
                snippet = torchtune_snippet(output, fmt, exp.model, exp.name)
                write_atomic(torchtune_yaml_path(output), snippet)
                write_atomic(manifest_path(output), json.dumps(manifest, indent=2) + "\n")
            except OSError as e:
                raise output_error(output, e) from e
            out.publish()
    finally:
        hasher.cancel()  # returns at once if the hashing is done; stops it if the run failed

    result.status, result.bytes = "converted", manifest["output"]["bytes"]
    log.info(
        "%s: wrote %s (%.1f MB, %d tensors, %d parameters) in %.1f s.",
        exp.name,
        output,
        result.bytes / 1e6,
        manifest["output"]["tensors"],
        manifest["output"]["parameters"],
        sum(times.values()),
    )
    return result


def _hashes(hasher: SourceHasher) -> dict[Path, str]:
    try:
        return hasher.result()
    except OSError as e:
        raise ConversionError(
            f"Cannot read {e.filename} to record its sha256 ({e.strerror}): the source "
            "checkpoint changed or vanished during the conversion. Run again."
        ) from e


def _check_not_source(given: Path, output: Path, checkpoint: DcpCheckpoint) -> None:
    """Refuses an output that is, links to, or lies beside the files of the source step."""
    step_dir = checkpoint.step_dir.resolve()
    for source in (checkpoint.metadata_path, *checkpoint.shard_sizes):
        if output == source.resolve() or (given.exists() and given.samefile(source)):
            raise ConversionError(
                f"experiment.output {given} is the source file {source} of the checkpoint being "
                "converted; writing it would destroy the checkpoint. Choose another output path."
            )
    if output.is_relative_to(step_dir):
        raise ConversionError(
            f"experiment.output {given} lies inside the source step folder {step_dir}; the "
            "converter never writes into a source checkpoint. Choose another output path."
        )


def _already_done(output: Path, print_: dict[str, Any], overwrite: bool) -> bool:
    """True if ``output`` holds this very conversion; raises if it holds another and may not
    be replaced."""
    if not output.exists():
        return False
    previous = read_manifest(output)
    if (
        previous is not None
        and previous.get("fingerprint") == print_
        # The manifest is written just before the output is renamed into place, so a run
        # killed in between leaves a new manifest beside an old file: check the file itself.
        and previous["output"]["bytes"] == output.stat().st_size
        and previous["output"]["sha256"] == sha256_file(output)
    ):
        return True
    if overwrite:
        log.info("Replacing %s (overwrite=true).", output)
        return False
    why = "another source or other settings" if previous else "no manifest of ours"
    raise ConversionError(
        f"Output {output} already exists, with {why}. Set overwrite=true to replace it, or "
        "choose another experiment.output."
    )


def _environment() -> dict[str, str]:
    """Where this job runs and logs, for the summary."""
    env: dict[str, str] = {}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        env["log_path"] = str(Path(hc.runtime.output_dir) / f"{hc.job.name}.log")
    info = _slurm_info()
    if info:
        env["slurm_job_id"] = info["job_id"]
        env["log_path"] = info["stderr"]
    return env


def _slurm_info() -> dict[str, str] | None:
    # submitit marks its jobs with these; outside one, skip importing it (a few tenths of a
    # second of every run's start-up).
    if not {"SUBMITIT_EXECUTOR", "SUBMITIT_DEBUG_JOB_ID"} & os.environ.keys():
        return None
    import submitit

    try:
        job = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return None
    paths = job.paths
    return {
        "job_id": str(job.job_id),
        "hostname": job.hostname,
        "stdout": str(paths.stdout).replace("%t", str(job.global_rank)),
        "stderr": str(paths.stderr).replace("%t", str(job.global_rank)),
    }


def _write_status(result: JobResult) -> None:
    """Leaves the result in the job's Hydra output folder, where the sweep summary finds it."""
    if HydraConfig.initialized():
        folder = Path(HydraConfig.get().runtime.output_dir)
        write_atomic(folder / STATUS_FILE, json.dumps(asdict(result), indent=2) + "\n")
