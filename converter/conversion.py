"""One checkpoint's conversion, from the validated step folder to the published output.

validate the DCP index and shard files -> plan every key -> skip if an identical conversion is
already on disk -> stream tensors into a partial file (flushed behind the writes) -> sync ->
read it back once (sha256, and the checks of ``verify=true``) -> publish under the final name,
then the manifest and recipe snippet beside it. Every step fails before anything is written if
the input is bad, or if a folder stands where a file is to go.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from converter.config import ConvertConfig, local_path
from converter.engine import Region, convert_tensors
from converter.errors import ConversionError
from converter.hashing import SourceHasher
from converter.manifest import (
    build_manifest,
    describes,
    fingerprint,
    manifest_path,
    read_manifest,
    torchtune_snippet,
    torchtune_yaml_path,
)
from converter.mapping import Plan, plan_conversion
from converter.sink import Filler, OutputFile
from converter.source import DcpCheckpoint
from converter.tasks import TaskGroup, check_answers
from converter.verify import read_back

log = logging.getLogger("titan2tune")


@dataclass(frozen=True)
class _Planned:
    """A validated source and its plan: what every task of the conversion starts from."""

    name: str
    step: int
    checkpoint: DcpCheckpoint
    plan: Plan
    output: Path
    output_format: str
    export_dtype: str
    sources: dict[Path, int]  # every file the conversion reads -> its size

    def source_bytes(self, keys: Collection[str]) -> int:
        return sum(self.checkpoint.tensors[k].nbytes for k in keys)


def convert(
    conf: ConvertConfig,
    cfg: DictConfig,
    step: int,
    step_dir: Path,
    hasher: SourceHasher,
    slurm: dict[str, Any] | None,
    group: TaskGroup,
) -> tuple[str, int]:
    """Converts ``step_dir`` as ``conf`` says, while ``hasher`` hashes its files; returns
    whether it was converted or skipped, and the output's size. With a shared ``group``, the
    lead (task 0) does that and the other tasks fill their share of the tensors."""
    times: dict[str, float] = {}
    t = time.perf_counter()
    planned = _plan(conf, step, step_dir, hasher, group)
    times["plan"] = time.perf_counter() - t
    if not group.lead:
        return _fill_share(conf, planned, hasher, group)
    return _lead(conf, cfg, planned, hasher, slurm, group, times)


def _plan(
    conf: ConvertConfig, step: int, step_dir: Path, hasher: SourceHasher, group: TaskGroup
) -> _Planned:
    exp = conf.experiment
    checkpoint = DcpCheckpoint(step_dir)
    sources = {checkpoint.metadata_path: checkpoint.metadata_path.stat().st_size}
    sources.update(checkpoint.shard_sizes)
    given = local_path(exp.output)
    output = given.resolve()
    _check_not_source(given, output, checkpoint)
    _check_not_folders(output)
    hasher.add(group.share_of(sources))
    export = exp.export_dtype.value
    fmt = conf.output_format.value
    plan = plan_conversion(
        checkpoint.tensors, checkpoint.byte_entries, exp.model, fmt, export, str(step_dir)
    )
    if group.lead:
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
        for assumption in plan.assumptions:
            log.warning("%s: %s", exp.name, assumption)
    return _Planned(exp.name, step, checkpoint, plan, output, fmt, export, sources)


def _lead(
    conf: ConvertConfig,
    cfg: DictConfig,
    planned: _Planned,
    hasher: SourceHasher,
    slurm: dict[str, Any] | None,
    group: TaskGroup,
    times: dict[str, float],
) -> tuple[str, int]:
    """The whole conversion, or with a shared group, all of it but the others' share."""
    output, plan, checkpoint = planned.output, planned.plan, planned.checkpoint
    model_dict = OmegaConf.to_container(cfg.experiment.model, resolve=True, enum_to_str=True)
    print_ = fingerprint(checkpoint, planned.output_format, planned.export_dtype, model_dict)
    group.clear_earlier_runs()
    existed = output.exists()

    t = time.perf_counter()
    mine = group.share_of({k: checkpoint.tensors[k].nbytes for k in plan.sources})
    sidecars = (manifest_path(output), torchtune_yaml_path(output))

    def staged_manifest_describes(staged: dict[Path, Path]) -> bool:
        return manifest_path(output) in staged and describes(
            read_manifest(output, staged=True), output
        )

    # Decided under the output's lock, once an interrupted publish is finished.
    with OutputFile(output, sidecars, staged_manifest_describes) as out:
        if _already_done(output, print_, conf):
            if existed:
                log.info(
                    "%s: %s is up to date with this source and settings; skipped.",
                    planned.name,
                    output,
                )
            else:  # a run started at the same time wrote this very output meanwhile
                log.info("%s: %s was just written by another run; skipped.", planned.name, output)
            return _skipped(output, group)
        filler = out.create({t.name: (t.shape, t.dtype) for t in plan.tensors})
        group.announce(
            {
                "status": "fill",
                "partial": str(filler.partial),
                "inode": filler.partial.stat().st_ino,
                "offsets": filler.offsets,
            }
        )
        regions = _fill(conf, planned, filler, mine, group)
        times["convert"] = time.perf_counter() - t
        source_sha256 = {}
        if group.shared:
            t = time.perf_counter()
            answers = group.answers()
            check_answers(answers, group)
            for answer in answers.values():
                for name, written in answer["regions"].items():
                    regions[name] += [Region(*r) for r in written]
                source_sha256.update({Path(p): h for p, h in answer["sha256"].items()})
            times["other_tasks_wait"] = time.perf_counter() - t
        t = time.perf_counter()
        output_sha256 = read_back(out.partial, plan, checkpoint, regions if conf.verify else None)
        times["verify" if conf.verify else "sha256"] = time.perf_counter() - t
        # Hashing the sources ran alongside; this waits only if it has not finished.
        t = time.perf_counter()
        source_sha256.update(_hashes(hasher, group.share_of(planned.sources)))
        times["source_sha256_wait"] = time.perf_counter() - t
        # Published after the output: no manifest or snippet is ever on disk without it.
        manifest = build_manifest(
            experiment=planned.name,
            step=planned.step,
            checkpoint=checkpoint,
            plan=plan,
            written=out.partial,
            output=output,
            output_sha256=output_sha256,
            output_format=planned.output_format,
            export_dtype=planned.export_dtype,
            durations=times,
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            fingerprint=print_,
            slurm=slurm,
            source_sha256=source_sha256,
        )
        model = conf.experiment.model
        snippet = torchtune_snippet(output, planned.output_format, model, planned.name)
        # The manifest last: it is what marks the output as this conversion's.
        out.publish(
            {
                torchtune_yaml_path(output): snippet,
                manifest_path(output): json.dumps(manifest, indent=2) + "\n",
            }
        )

    log.info(
        "%s: wrote %s (%.1f MB, %d tensors, %d parameters) in %.1f s%s.",
        planned.name,
        output,
        manifest["output"]["bytes"] / 1e6,
        manifest["output"]["tensors"],
        manifest["output"]["parameters"],
        sum(times.values()),
        f", filled by {group.count} tasks" if group.shared else "",
    )
    return "converted", manifest["output"]["bytes"]


def _skipped(output: Path, group: TaskGroup) -> tuple[str, int]:
    group.announce({"status": "skipped"})
    group.answers()
    return "skipped", output.stat().st_size


def _fill(
    conf: ConvertConfig,
    planned: _Planned,
    filler: Filler,
    sources: Collection[str],
    group: TaskGroup,
) -> dict[str, list[Region]]:
    """Converts the source tensors ``sources`` into ``filler`` and syncs it."""
    desc = planned.name if not group.shared else f"{planned.name} ({group})"
    with tqdm(
        total=planned.source_bytes(sources), unit="B", unit_scale=True, desc=desc, mininterval=1.0
    ) as bar:
        regions = convert_tensors(
            planned.checkpoint,
            planned.plan,
            filler,
            workers=conf.workers,
            budget_bytes=conf.batch_mb << 20,
            allow_nonfinite=conf.allow_nonfinite,
            progress=bar.update,
            only=set(sources),
            stopped=group.stopped if group.shared and not group.lead else lambda: False,
        )
    filler.sync()
    return regions


def _fill_share(
    conf: ConvertConfig, planned: _Planned, hasher: SourceHasher, group: TaskGroup
) -> tuple[str, int]:
    """A task other than the lead: fills its share of the lead's partial file."""
    plan, checkpoint = planned.plan, planned.checkpoint
    told = group.instructions()
    if told["status"] != "fill":
        group.answer({"seen": told["status"]})
        return told["status"], 0
    partial = Path(told["partial"])
    if list(told["offsets"]) != [t.name for t in plan.tensors]:
        raise ConversionError(f"{group} planned other tensors than task 0 announced.")
    if partial.stat().st_ino != told["inode"]:
        raise ConversionError(f"{partial} is not the file task 0 created (another run's?).")
    mine = group.share_of({k: checkpoint.tensors[k].nbytes for k in plan.sources})
    filler = Filler(partial, told["offsets"], planned.output)
    try:
        regions = _fill(conf, planned, filler, mine, group)
    finally:
        filler.close()
    source_sha256 = _hashes(hasher, group.share_of(planned.sources))
    group.answer(
        {
            "regions": {n: [astuple(r) for r in rs] for n, rs in regions.items() if rs},
            "sha256": {str(p): h for p, h in source_sha256.items()},
        }
    )
    written = sum(r.length for rs in regions.values() for r in rs)
    log.info("%s: %s filled %.1f MB of %s.", planned.name, group, written / 1e6, partial)
    return "converted", written


def _hashes(hasher: SourceHasher, sources: list[Path]) -> dict[Path, str]:
    try:
        return hasher.result(sources)
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


def _check_not_folders(output: Path) -> None:
    """Refuses, before any work, a folder where the output or a file beside it is to go:
    no run replaces a folder, with overwrite=true or without."""
    if output.is_dir():
        raise ConversionError(
            f"experiment.output {output} is a folder; the output is one file, and the converter "
            f"never replaces a folder. Choose a file path (such as {output / 'model.pt'}) or "
            "remove the folder, then run again."
        )
    for path in (manifest_path(output), torchtune_yaml_path(output)):
        if path.is_dir():
            raise ConversionError(
                f"{path} is a folder, where the converter writes a file that describes "
                f"experiment.output {output}. Remove or rename the folder, or choose another "
                "experiment.output, then run again."
            )


def _already_done(output: Path, print_: dict[str, Any], conf: ConvertConfig) -> bool:
    """True if ``output`` holds this very conversion (and ``force`` is off); raises if it holds
    another and may not be replaced, saying what differs."""
    if not output.exists():
        return False
    previous = read_manifest(output)
    # The file itself is checked too: an old manifest beside a replaced file does not count.
    if previous and previous.get("fingerprint") == print_ and describes(previous, output):
        if not conf.force:
            return True
        log.info("Converting %s again (force=true), though it is up to date.", output)
        return False
    if conf.overwrite or conf.force:
        log.info("Replacing %s (%s).", output, "overwrite=true" if conf.overwrite else "force=true")
        return False
    if previous is None:
        why = "with no manifest of ours (not written by this converter, or its manifest is gone)"
    else:
        why = "but " + "; ".join(_differences(previous, print_, output))
    raise ConversionError(
        f"Output {output} already exists, {why}. Set overwrite=true to replace it, or choose "
        "another experiment.output."
    )


def _differences(previous: dict[str, Any], print_: dict[str, Any], output: Path) -> list[str]:
    """What makes the conversion on disk another than this one, in a user's words."""
    old = previous.get("fingerprint") or {}
    found = []
    if old.get("step_dir") != print_["step_dir"]:
        found.append(
            f"it was converted from {old.get('step_dir')}, this run reads {print_['step_dir']}"
        )
    for key in ("output_format", "export_dtype", "model"):
        if old.get(key) != print_[key]:
            found.append(f"its {key} was {old.get(key)}, this run's is {print_[key]}")
    if old.get("step_dir") == print_["step_dir"]:
        changed = sorted(
            name for name, seen in print_["files"].items() if old.get("files", {}).get(name) != seen
        )
        changed += sorted(set(old.get("files", {})) - set(print_["files"]))
        if changed or old.get("metadata_sha256") != print_["metadata_sha256"]:
            what = ", ".join(changed) or ".metadata"
            found.append(f"the source files changed since it was converted ({what})")
    if old.get("converter") != print_["converter"]:
        found.append(f"it was written by titan2tune {old.get('converter')}")
    if not describes(previous, output):
        found.append(f"its bytes no longer match its manifest {manifest_path(output)}")
    return found or ["it was written with other settings"]
