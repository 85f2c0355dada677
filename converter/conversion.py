"""One checkpoint's conversion, from the validated step folder to the published output.

source -> plan -> engine -> the format's files -> verify -> publish:

read and validate the DCP index and its shard files, and the family plans every key for the
format (``converter.planned``) -> skip if an identical conversion is already on disk
(``converter.up_to_date``) -> the format writes its files' structure under a partial name ->
the engine streams the tensors' bytes into place, read back once behind the writes (digests,
and the checks of ``verify=true``) and flushed -> sync -> publish under the final name, with
the manifest and the format's describing files. Every step fails before anything is written
if the input is bad, or if a folder stands where a file is to go. With a shared
``TaskGroup`` (a SLURM job of several tasks), task 0 does all of that and every task fills
its share of the tensors.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import astuple
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from converter.config import ConvertConfig, to_plain
from converter.digests import content_digests
from converter.dry_run import describe_plan, record_rate
from converter.engine import Filled, convert_tensors
from converter.errors import ConversionError, environment_error, n_tensors, output_error
from converter.filler import Filler, Region
from converter.formats import FORMATS
from converter.formats.base import Described, OutputFormat
from converter.manifest import build_manifest, describes, manifest_path, read_manifest
from converter.planned import Planned, plan_conversion, torch_dtype
from converter.publish import Output, staging_path
from converter.sources.storage import Storage, redacted
from converter.tasks import SlurmInfo, TaskGroup, check_answers
from converter.up_to_date import already_done, fingerprint
from converter.verify import ReadBehind, Staged, read_back

log = logging.getLogger("titan2tune")


class Status(str, Enum):
    """How a job ended (a str too: the summary's JSON and a test compare it as one)."""

    converted = "converted"
    skipped = "skipped"
    planned = "planned"  # dry_run=true: the plan was printed, nothing written
    failed = "failed"

    def __str__(self) -> str:
        return self.value


def convert(
    conf: ConvertConfig,
    storage: Storage,
    step: int,
    step_dir: str,
    slurm: SlurmInfo | None,
    group: TaskGroup,
) -> tuple[Status, int]:
    """Converts ``step_dir`` as ``conf`` says; returns whether it was converted or skipped,
    and the output's size. With a shared ``group``, the lead (task 0) does that and the other
    tasks fill their share of the tensors."""
    _check_environment(FORMATS[conf.output_format.name])
    times: dict[str, float] = {}
    t = time.perf_counter()
    planned = plan_conversion(conf, storage, step, step_dir, group)
    times["plan"] = time.perf_counter() - t
    if conf.dry_run:
        print(describe_plan(planned), flush=True)
        return Status.planned, planned.output_bytes
    if not group.lead:
        return _fill_share(planned, group)
    return _lead(planned, slurm, group, times)


def _check_environment(fmt: OutputFormat) -> None:
    """torch's bridge to numpy gives the byte views that every read, digest and write goes
    through, and the format's files are read back with their consumers' library (both
    declared dependencies, which a virtualenv can still lack): checked before any work, so that
    an absence is named as the environment's, not blamed on a shard after the conversion."""
    try:
        torch.empty(1).numpy()
    except (ImportError, RuntimeError) as e:
        raise environment_error("Viewing tensors as bytes (torch's bridge to numpy)", e) from e
    for module in fmt.reads_back_with:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise environment_error(f"Reading {fmt.name} files back with {module}", e) from e


# -------------------------------------------------------------------- the lead's conversion


def _lead(
    planned: Planned, slurm: SlurmInfo | None, group: TaskGroup, times: dict[str, float]
) -> tuple[Status, int]:
    """The whole conversion, or with a shared group, all of it but the others' share."""
    output, fmt = planned.output, planned.fmt
    print_ = fingerprint(planned)
    group.clear_earlier_runs()
    existed = output.exists()
    sidecars = () if fmt.folder else _sidecars(planned)
    # Decided under the output's lock, once an interrupted publish is finished.
    with Output(output, fmt.folder, sidecars, _staged_manifest_describes(output)) as out:
        if already_done(planned, print_):
            if existed:
                log.info("%s: %s is up to date with this source and settings; skipped.",
                         planned.name, output)  # fmt: skip
            else:  # a run started at the same time wrote this very output meanwhile
                log.info("%s: %s was just written by another run; skipped.", planned.name, output)
            group.announce({"status": "skipped"})
            group.answers()
            return Status.skipped, _size(output)
        try:
            staged, behind, filled, syncing = _convert_into(out, planned, group, times, print_)
        except Exception as e:
            # A local source file cut short or replaced meanwhile fails a read, or a write from
            # its mapping (EFAULT), in ways that blame the output or look like a bug: said as it
            # is. (Object stores pin their reads: a replaced object fails as changed.)
            if not planned.index.storage.remote and (changed := _source_change(planned)):
                raise ConversionError(changed) from e
            raise
        if changed := _source_change(planned):
            raise ConversionError(changed)
        files = _read_back(planned, staged, behind, filled, syncing, times)
        manifest, described = _describe(planned, filled, files, times, print_, slurm)
        out.publish(described)

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
    record_rate(planned, sum(times.values()))
    return Status.converted, manifest["output"]["bytes"]


def _source_change(planned: Planned) -> str | None:
    """The source files, listed again once every tensor was read (or a conversion failed): a
    file rewritten meanwhile (a new size or version) may have given the output bytes of two
    saves, which this says.
    Object stores pin their reads to the version listed; this catches the rest (a local
    folder, most of all)."""
    index = planned.index
    now = {e.name: e for e in index.storage.listdir(index.step_dir) if not e.is_dir}
    for path, was in index.files.items():
        seen = now.get(index.storage.name(path))
        if seen is None or (seen.size, seen.version) != (was.size, was.version):
            return (
                f"{index.storage.display(path)} changed while it was being converted (it is "
                f"{'gone' if seen is None else 'rewritten'}): the output could mix two saves, "
                "and was not kept. Convert again once nothing writes to the step folder."
            )
    return None


def _staged_manifest_describes(output: Path) -> Callable[[dict[Path, Path]], bool]:
    """Whether the sidecars a killed run left staged beside a one-file output describe it."""

    def describes_output(staged: dict[Path, Path]) -> bool:
        manifest = manifest_path(output, False)
        return manifest in staged and describes(
            read_manifest(staging_path(manifest)), output, False, staged
        )

    return describes_output


def _convert_into(
    out: Output,
    planned: Planned,
    group: TaskGroup,
    times: dict[str, float],
    print_: dict[str, Any],
) -> tuple[list[Staged], ReadBehind, Filled, Future[None]]:
    """The format's files created and filled (by every task of a shared group, which must
    have planned from the same source and settings: ``print_``); returns them, their
    read-back, what was written and read, and the sync of the files, under way."""
    t = time.perf_counter()
    staged, behind, filler = _create(out, planned, group)
    group.announce(
        {
            "status": "fill",
            "files": {name: str(path) for name, path in filler.files.items()},
            "inodes": {name: path.stat().st_ino for name, path in filler.files.items()},
            "offsets": filler.offsets,
            "fingerprint": print_,
        }
    )
    mine = group.share_of({k: planned.index.tensors[k].nbytes for k in planned.plan.sources})
    filled = _fill(planned, filler, mine, group)
    syncing = filler.sync_behind()
    times["convert"] = time.perf_counter() - t
    if group.shared:
        t = time.perf_counter()
        filled = _with_answers(filled, group, behind)
        times["other_tasks_wait"] = time.perf_counter() - t
    return staged, behind, filled, syncing


def _read_back(
    planned: Planned,
    staged: list[Staged],
    behind: ReadBehind,
    filled: Filled,
    syncing: Future[None],
    times: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Each file's size and digests, every written byte checked with ``verify=true``; the
    rest of the read-back, while the files are synced, which this waits for."""
    conf = planned.conf
    t = time.perf_counter()
    files = read_back(
        planned.fmt,
        staged,
        planned.plan,
        planned.reader,
        behind,
        filled.regions if conf.verify else None,
    )
    times["verify" if conf.verify else "digest"] = time.perf_counter() - t
    t = time.perf_counter()
    syncing.result()
    times["sync_wait"] = time.perf_counter() - t
    return files


def _describe(
    planned: Planned,
    filled: Filled,
    files: dict[str, dict[str, Any]],
    times: dict[str, float],
    print_: dict[str, Any],
    slurm: SlurmInfo | None,
) -> tuple[dict[str, Any], dict[Path, str | bytes | Path]]:
    """The manifest, and every describing file to publish with the output (the manifest
    last: it is what marks the output as this conversion's)."""
    conf, fmt, output = planned.conf, planned.fmt, planned.output
    described = Described(
        output,
        planned.name,
        planned.family,
        planned.arch,
        planned.plan,
        conf.output_format,
        planned.tokenizer_dir,
        planned.assets,
    )
    texts = {
        n: _bytes(c) for n, c in _describing_files(fmt.describe(described), output, fmt).items()
    }
    # In the manifest with their digests: a folder's, as its shards; a file's (the recipe
    # snippet beside a .pt), as its sidecars, so that an edited or lost one is not up to date.
    digests = {
        str(n) if fmt.folder else n.name: content_digests(c, conf.sha256) for n, c in texts.items()
    }
    files |= digests if fmt.folder else {}
    sidecars = {} if fmt.folder else digests
    missing = fmt.missing(described)
    for what in [*missing, *_altered_values(filled, torch_dtype(conf.experiment.export_dtype))]:
        log.warning("%s: %s", planned.name, what)
    manifest = build_manifest(
        experiment=planned.name,
        source=_source_record(planned, filled),
        plan=planned.plan,
        output=output,
        output_format=fmt.name,
        loads_with=fmt.loads_with(described),
        export_dtype=str(conf.experiment.export_dtype),
        files=files,
        sidecars=sidecars,
        missing=missing,
        durations=times,
        config=_config_record(conf),
        fingerprint=print_,
        slurm=dataclasses.asdict(slurm) if slurm else None,
        nonfinite=filled.nonfinite,
        underflowed_to_zero=filled.underflowed_to_zero,
    )
    texts[_described_name(manifest_path(output, fmt.folder), output, fmt)] = (
        json.dumps(manifest, indent=2) + "\n"
    )
    return manifest, texts


def _altered_values(filled: Filled, export: torch.dtype | None) -> list[str]:
    """What the log says of values written that are not the source's (see ``engine.Filled``)."""
    said = []
    if filled.nonfinite:
        what = "NaN/Inf values were written (allow_nonfinite=true)"
        said.append(_counted(filled.nonfinite, what, "nonfinite"))
    if filled.underflowed_to_zero:
        assert export is not None, "a cast underflows, and keep casts nothing"
        info = torch.finfo(export)
        what = (
            f"non-zero values underflowed to 0 in {str(export).removeprefix('torch.')} (below "
            f"{info.tiny * info.eps / 2:.2g}, half its smallest subnormal)"
        )
        said.append(_counted(filled.underflowed_to_zero, what, "underflowed_to_zero"))
    return said


def _counted(counts: dict[str, int], what: str, field: str) -> str:
    name, most = max(counts.items(), key=lambda kv: kv[1])
    return (
        f"{sum(counts.values())} {what}, in {n_tensors(len(counts))} (most in {name!r}: {most}); "
        f"the manifest's {field} counts them per tensor."
    )


def _bytes(content: str | bytes | Path) -> bytes:
    """A describing file's bytes: what is written is what its digests are taken of."""
    if isinstance(content, Path):
        return content.read_bytes()
    return content.encode() if isinstance(content, str) else content


def _sidecars(planned: Planned) -> tuple[Path, ...]:
    """The files beside a one-file output that describe it."""
    output = planned.output
    names = [manifest_path(output, False).name, *planned.fmt.describe_names(output)]
    return tuple(output.with_name(n) for n in names)


def _described_name(path: Path, output: Path, fmt: OutputFormat) -> Path:
    """Where ``Output.publish`` wants a describing file: beside, or inside relative."""
    return path.relative_to(output) if fmt.folder else path


def _describing_files(
    files: dict[str, str | Path], output: Path, fmt: OutputFormat
) -> dict[Path, str | Path]:
    return {Path(n) if fmt.folder else output.with_name(n): c for n, c in files.items()}


def _create(
    out: Output, planned: Planned, group: TaskGroup
) -> tuple[list[Staged], ReadBehind, Filler]:
    """The format writes each file's structure; returns them, their read-back, and the means
    to fill them."""
    staged = []
    for name, tensors in planned.fmt.files(planned.plan, planned.conf.output_format).items():
        path = out.staging(name)
        try:
            offsets = planned.fmt.create(path, tensors)
        except OSError as e:
            raise output_error(planned.output, e) from e
        staged.append(Staged(name, path, tensors, offsets))
    offsets = {n: (s.name, o) for s in staged for n, o in s.offsets.items()}
    conf, tied = planned.conf, [name for _, name in planned.plan.tied]
    # Tasks sharing the conversion: read once the others answer (see ReadBehind).
    lag = {"lag": None} if group.shared else {}
    behind = ReadBehind(staged, conf.verify, conf.sha256, whole=tied, workers=conf.workers, **lag)
    # Blocks allocated up front for a lone run, not for tasks sharing it (see filler).
    return staged, behind, out.filler(offsets, allocate=not group.shared, follower=behind)


def _fill(planned: Planned, filler: Filler, sources: Collection[str], group: TaskGroup) -> Filled:
    """Converts the source tensors ``sources`` into ``filler``."""
    conf = planned.conf
    desc = planned.name if not group.shared else f"{planned.name} ({group})"
    with tqdm(
        total=planned.source_bytes(sources), unit="B", unit_scale=True, desc=desc, mininterval=1.0
    ) as bar:
        filled = convert_tensors(
            planned.reader,
            planned.plan,
            filler,
            workers=conf.workers,
            budget_bytes=conf.batch_mb << 20,
            allow_nonfinite=conf.allow_nonfinite,
            progress=bar.update,
            only=set(sources),
            stopped=group.stopped if group.shared and not group.lead else lambda: False,
        )
    return filled


def _with_answers(filled: Filled, group: TaskGroup, behind: ReadBehind) -> Filled:
    """The lead's own work with what the other tasks wrote and read; what they wrote is read
    back too."""
    answers = group.answers()
    check_answers(answers, group)
    regions = {name: list(rs) for name, rs in filled.regions.items()}
    digests = dict(filled.source_digests)
    nonfinite, underflowed = Counter(filled.nonfinite), Counter(filled.underflowed_to_zero)
    for answer in answers.values():
        for name, written in answer["regions"].items():
            for region in (Region(*r) for r in written):
                regions[name].append(region)
                behind.wrote(name, region)
        digests.update(answer["digests"])
        nonfinite.update(answer["nonfinite"])
        underflowed.update(answer["underflowed_to_zero"])
    return Filled(regions, digests, dict(nonfinite), dict(underflowed))


def _fill_share(planned: Planned, group: TaskGroup) -> tuple[Status, int]:
    """A task other than the lead: fills its share of the lead's partial files."""
    plan = planned.plan
    told = group.instructions()
    if told["status"] != "fill":
        group.answer({"seen": told["status"]})
        return Status(told["status"]), 0
    files = {name: Path(path) for name, path in told["files"].items()}
    offsets = {name: (file, offset) for name, (file, offset) in told["offsets"].items()}
    if sorted(offsets) != sorted(t.name for t in plan.tensors):
        raise ConversionError(f"{group} planned other tensors than task 0 announced.")
    for name, path in files.items():
        if path.stat().st_ino != told["inodes"][name]:
            raise ConversionError(f"{path} is not the file task 0 created (another run's?).")
    # Each task finds the step and lists its files itself: a save that finished, or files
    # that changed, between two tasks' listings would mix two sources in one output.
    seen, lead_seen = fingerprint(planned), told["fingerprint"]
    if seen != lead_seen:
        differ = sorted(k for k in {*seen, *lead_seen} if seen.get(k) != lead_seen.get(k))
        if {"step_dir", "metadata_xxh3_128", "files"} & set(differ):
            why = (
                "A save finished, or the checkpoint's files changed, between the tasks' "
                "listings; run the job again, or name experiment.step."
            )
        else:  # the installed converter, the tokenizer files, the settings composed
            why = (
                "The tasks' environments differ (the titan2tune installed, the tokenizer "
                "files, the config they composed): run every task from one installation."
            )
        raise ConversionError(
            f"{group} planned from another source or other settings than task 0 (their "
            f"{', '.join(differ)} differ: task 0 read {lead_seen['step_dir']}, this task "
            f"{seen['step_dir']}). {why}"
        )
    mine = group.share_of({k: planned.index.tensors[k].nbytes for k in plan.sources})
    filler = Filler(files, offsets, planned.output)
    try:
        filled = _fill(planned, filler, mine, group)
        filler.sync()
    finally:
        filler.close()
    group.answer(
        {
            "regions": {n: [astuple(r) for r in rs] for n, rs in filled.regions.items() if rs},
            "digests": filled.source_digests,
            "nonfinite": filled.nonfinite,
            "underflowed_to_zero": filled.underflowed_to_zero,
        }
    )
    written = sum(r.length for rs in filled.regions.values() for r in rs)
    log.info("%s: %s filled %.1f MB of %s.", planned.name, group, written / 1e6, planned.output)
    return Status.converted, written


# -------------------------------------------------------------------- what the manifest says


def _source_record(planned: Planned, filled: Filled) -> dict[str, Any]:
    index, plan = planned.index, planned.plan
    storage = index.storage
    read = {**planned.checked, **filled.source_digests}
    return {
        "checkpoint_dir": storage.display(storage.root),
        "step": planned.step,
        "step_dir": storage.display(index.step_dir),
        "family": plan.family,
        "layout": plan.layout,
        "kind": "weights_only" if plan.weights_only else "full",
        # The files as listed: the size and version (mtime_ns, or an object's ETag) of each.
        "files": {
            storage.name(path): {"bytes": info.size, storage.version_kind: info.version}
            for path, info in index.files.items()
        },
        "bytes_read": sum(index.tensors[k].nbytes for k in read),
        # How the files are identified (mtime_ns locally; ETags in an object store, whose
        # objects are not hashed, as they are not downloaded whole) and, for an object store,
        # the bytes downloaded by this process.
        "storage": storage.describe(),
        # DCP keeps no checksums: the XXH3-128 of each tensor's bytes as read (row-major, the
        # dtype as saved) names any tensor whose bytes change later.
        "tensors": {
            key: {"bytes": index.tensors[key].nbytes, "xxh3_128": digest}
            for key, digest in sorted(read.items())
        },
    }


def _config_record(conf: ConvertConfig) -> dict[str, Any]:
    """The resolved config for the manifest, without the secrets of storage_options."""
    plain = to_plain(conf)
    plain["experiment"]["storage_options"] = redacted(plain["experiment"]["storage_options"])
    return plain


def _size(output: Path) -> int:
    if output.is_dir():
        return sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    return output.stat().st_size
