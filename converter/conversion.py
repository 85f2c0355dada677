"""One checkpoint's conversion, from the validated step folder to the published output.

source -> plan -> engine -> the format's files -> verify -> publish:

read and validate the DCP index and its shard files -> the family plans every key for the
format -> skip if an identical conversion is already on disk -> the format writes its files'
structure under a partial name -> the engine streams the tensors' bytes into place (flushed
behind the writes) -> sync -> read back once (digests, and the checks of ``verify=true``) ->
publish under the final name, with the manifest and the format's describing files. Every step
fails before anything is written if the input is bad, or if a folder stands where a file is to
go. With a shared ``TaskGroup`` (a SLURM job of several tasks), task 0 does all of that and
every task fills its share of the tensors.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import astuple, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import xxhash
from omegaconf import OmegaConf
from tqdm import tqdm

from converter.config import ConvertConfig, ExportDtype, local_path, redacted
from converter.digests import content_digests, file_digest
from converter.engine import Filled, Region, convert_tensors
from converter.errors import ConversionError, environment_error, output_error
from converter.filler import Filler
from converter.formats import FORMATS
from converter.formats.base import Described, OutputFormat
from converter.manifest import (
    build_manifest,
    describes,
    manifest_path,
    mismatches,
    package_versions,
    read_manifest,
)
from converter.models import FAMILIES, family_of
from converter.models.base import Era, ModelFamily, build_plan
from converter.plan import Plan
from converter.publish import Output, staging_path, write_atomic
from converter.sources.dcp import DcpIndex
from converter.sources.reader import TensorReader
from converter.sources.steps import METADATA_FILE
from converter.sources.storage import LocalStorage, Storage, local_part
from converter.tasks import SlurmInfo, TaskGroup, check_answers
from converter.verify import Staged, read_back

log = logging.getLogger("titan2tune")
# Workers that hide an object store's latency (measured against a store 50 ms away: 4 workers
# converted in a third of one worker's time; more gained little).
_REMOTE_WORKERS = 4


class Status(str, Enum):
    """How a job ended (a str too: the summary's JSON and a test compare it as one)."""

    converted = "converted"
    skipped = "skipped"
    planned = "planned"  # dry_run=true: the plan was printed, nothing written
    failed = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class _Planned:
    """A validated source and its plan: what every task of the conversion starts from."""

    conf: ConvertConfig
    step: int
    index: DcpIndex
    reader: TensorReader
    family: ModelFamily
    fmt: OutputFormat
    plan: Plan
    arch: Any
    output: Path
    tokenizer_dir: Path | None
    assets: dict[str, Path]  # files the output copies in (name in it -> file)

    @property
    def name(self) -> str:
        return self.conf.experiment.name

    @property
    def output_bytes(self) -> int:
        """The tensors' bytes in the output (its files' headers aside)."""
        return sum(t.dtype.itemsize * math.prod(t.shape) for t in self.plan.tensors)

    def source_bytes(self, keys: Collection[str]) -> int:
        return sum(self.index.tensors[k].nbytes for k in keys)


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
    planned = _plan(conf, storage, step, step_dir, group)
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


# -------------------------------------------------------------------- plan


def _plan(
    conf: ConvertConfig, storage: Storage, step: int, step_dir: str, group: TaskGroup
) -> _Planned:
    exp = conf.experiment
    index = DcpIndex(storage, step_dir)
    reader = TensorReader(index)
    fmt = FORMATS[conf.output_format.name]
    given = local_path(exp.output)
    output = given.resolve()
    tokenizer_dir = local_path(exp.tokenizer_dir).resolve() if exp.tokenizer_dir else None
    if isinstance(storage, LocalStorage):
        _check_not_source(given, output, index)
    _check_not_folders(output, fmt)
    if fmt.folder and tokenizer_dir and tokenizer_dir.is_relative_to(output):
        raise ConversionError(
            f"experiment.output {output} holds experiment.tokenizer_dir {tokenizer_dir}: "
            "replacing the output would delete the tokenizer files it copies. Choose another "
            "output folder."
        )
    family = family_of(exp.model)
    plan, arch = build_plan(
        family,
        exp.model,
        {k: (e.shape, e.dtype) for k, e in index.tensors.items()},
        index.byte_entries,
        fmt.naming,
        fmt.keeps_tied_head,
        _torch_dtype(exp.export_dtype),
        lambda key: reader.read_tensor(index.tensors[key]),
        storage.display(step_dir),
        FAMILIES.values(),
    )
    if group.lead:
        log.info(
            "%s: step-%d of %s, %s layout %s (%s checkpoint): %d tensors to write as %s/%s, "
            "%d keys left out.",
            exp.name,
            step,
            storage.display(storage.root),
            family.name,
            plan.layout,
            "weights-only" if plan.weights_only else "full training",
            len(plan.tensors),
            fmt.name,
            exp.export_dtype,
            len(plan.dropped),
        )
        for line in plan.left_out():
            log.info("%s: left out: %s", exp.name, line)
        for assumption in plan.assumptions:
            log.warning("%s: %s", exp.name, assumption)
        if storage.remote and conf.workers < _REMOTE_WORKERS:
            log.info(
                "%s: reading an object store with workers=%d: each worker waits a round trip "
                "per window, which small tensors make many; workers=%d or more keeps more "
                "requests in flight (memory stays within batch_mb).",
                exp.name,
                conf.workers,
                _REMOTE_WORKERS,
            )
    assets = fmt.assets(tokenizer_dir, arch)
    return _Planned(
        conf, step, index, reader, family, fmt, plan, arch, output, tokenizer_dir, assets
    )


def _torch_dtype(export: ExportDtype) -> torch.dtype | None:
    return None if export is ExportDtype.keep else getattr(torch, export.value)


# -------------------------------------------------------------------- the lead's conversion


def _lead(
    planned: _Planned, slurm: SlurmInfo | None, group: TaskGroup, times: dict[str, float]
) -> tuple[Status, int]:
    """The whole conversion, or with a shared group, all of it but the others' share."""
    output, fmt = planned.output, planned.fmt
    print_ = fingerprint(planned)
    group.clear_earlier_runs()
    existed = output.exists()
    sidecars = () if fmt.folder else _sidecars(planned)
    # Decided under the output's lock, once an interrupted publish is finished.
    with Output(output, fmt.folder, sidecars, _staged_manifest_describes(output)) as out:
        if _already_done(planned, print_):
            if existed:
                log.info("%s: %s is up to date with this source and settings; skipped.",
                         planned.name, output)  # fmt: skip
            else:  # a run started at the same time wrote this very output meanwhile
                log.info("%s: %s was just written by another run; skipped.", planned.name, output)
            group.announce({"status": "skipped"})
            group.answers()
            return Status.skipped, _size(output)
        try:
            staged, filled, syncing = _convert_into(out, planned, group, times, print_)
        except Exception as e:
            # A local source file cut short or replaced meanwhile fails a read, or a write from
            # its mapping (EFAULT), in ways that blame the output or look like a bug: said as it
            # is. (Object stores pin their reads: a replaced object fails as changed.)
            if not planned.index.storage.remote and (changed := _source_change(planned)):
                raise ConversionError(changed) from e
            raise
        if changed := _source_change(planned):
            raise ConversionError(changed)
        files = _read_back(planned, staged, filled, syncing, times)
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
    _record_rate(planned, sum(times.values()))
    return Status.converted, manifest["output"]["bytes"]


def _source_change(planned: _Planned) -> str | None:
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
    planned: _Planned,
    group: TaskGroup,
    times: dict[str, float],
    print_: dict[str, Any],
) -> tuple[list[Staged], Filled, Future[None]]:
    """The format's files created and filled (by every task of a shared group, which must
    have planned from the same source and settings: ``print_``); returns them, what was
    written and read, and the sync of the files, under way."""
    t = time.perf_counter()
    staged, filler = _create(out, planned, group)
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
        filled = _with_answers(filled, group)
        times["other_tasks_wait"] = time.perf_counter() - t
    return staged, filled, syncing


def _read_back(
    planned: _Planned,
    staged: list[Staged],
    filled: Filled,
    syncing: Future[None],
    times: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Each file's size and digests, every written byte checked with ``verify=true``; read
    while the files are synced, which this waits for."""
    conf = planned.conf
    t = time.perf_counter()
    files = read_back(
        planned.fmt,
        staged,
        planned.plan,
        planned.reader,
        filled.regions if conf.verify else None,
        conf.sha256,
        conf.workers,
    )
    times["verify" if conf.verify else "digest"] = time.perf_counter() - t
    t = time.perf_counter()
    syncing.result()
    times["sync_wait"] = time.perf_counter() - t
    return files


def _describe(
    planned: _Planned,
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
    for what in [*missing, *_altered_values(filled, _torch_dtype(conf.experiment.export_dtype))]:
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
        f"{sum(counts.values())} {what}, in {_tensors(len(counts))} (most in {name!r}: {most}); "
        f"the manifest's {field} counts them per tensor."
    )


def _tensors(n: int) -> str:
    return f"{n} tensor{'s' * (n != 1)}"


def describe_plan(planned: _Planned) -> str:
    """What ``dry_run=true`` prints: the layout, every output tensor and where it comes from,
    what is left out and why, the output's size, and how long it should take."""
    plan, storage = planned.plan, planned.index.storage
    lines = [
        f"{planned.name}: step-{planned.step} of {storage.display(storage.root)}",
        f"  layout: {planned.family.name} {_era(planned).describe()}, "
        f"{'weights-only' if plan.weights_only else 'full training'} checkpoint",
        f"  output: {planned.output} ({planned.fmt.name}, {planned.conf.experiment.export_dtype}),"
        f" {len(plan.tensors)} tensors, {planned.output_bytes / 1e6:.1f} MB",
    ]
    width = max((len(t.name) for t in plan.tensors), default=0)
    for t in plan.tensors:
        sources = sorted({p.source for p in t.pieces})
        how = " (rows reordered per head)" if any(p.reorder for p in t.pieces) else ""
        lines.append(
            f"    {t.name:<{width}}  {str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            f"  <- {', '.join(sources)}{how}"
        )
    lines.append(f"  left out: {len(plan.dropped)} keys")
    lines += [f"    {line}" for line in plan.left_out()]
    for assumption in plan.assumptions:
        lines.append(f"  assumed: {assumption}")
    read = planned.source_bytes(plan.sources)
    rate = last_rate()
    if rate is None:
        lines.append(f"  reads {read / 1e6:.1f} MB; no conversion measured on this machine yet")
    else:
        seconds = read / 1e6 / rate["mb_per_s"]
        lines.append(
            f"  reads {read / 1e6:.1f} MB: about {seconds:.1f} s at the last measured "
            f"{rate['mb_per_s']:.0f} MB/s ({rate['experiment']}, {rate['when']})"
        )
    lines.append("  nothing was written (dry_run=true)")
    return "\n".join(lines)


def _era(planned: _Planned) -> Era:
    return next(e for e in planned.family.eras if e.name == planned.plan.layout)


def _rate_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "titan2tune" / "last_rate.json"


def last_rate() -> dict[str, Any] | None:
    """The source MB/s of the last conversion on this machine (for dry_run's estimate)."""
    try:
        rate = json.loads(_rate_file().read_text())
    except (OSError, ValueError):
        return None
    # A file of another shape (edited, damaged) is no measurement: the estimate is left out.
    valid = (
        isinstance(rate, dict)
        and isinstance(rate.get("mb_per_s"), int | float)
        and rate["mb_per_s"] > 0
        and all(isinstance(rate.get(k), str) for k in ("experiment", "when"))
    )
    return rate if valid else None


def _record_rate(planned: _Planned, seconds: float) -> None:
    """Remembers this conversion's MB/s; a failure to write it does not fail the conversion."""
    read = planned.source_bytes(planned.plan.sources)
    if seconds <= 0 or not read:
        return
    rate = {
        "mb_per_s": read / 1e6 / seconds,
        "experiment": planned.name,
        "when": time.strftime("%Y-%m-%d %H:%M"),
    }
    try:
        _rate_file().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(_rate_file(), json.dumps(rate) + "\n")
    except OSError as e:
        log.debug("Cannot record the conversion rate in %s: %s", _rate_file(), e)


def _bytes(content: str | bytes | Path) -> bytes:
    """A describing file's bytes: what is written is what its digests are taken of."""
    if isinstance(content, Path):
        return content.read_bytes()
    return content.encode() if isinstance(content, str) else content


def _sidecars(planned: _Planned) -> tuple[Path, ...]:
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


def _create(out: Output, planned: _Planned, group: TaskGroup) -> tuple[list[Staged], Filler]:
    """The format writes each file's structure; returns them, and the means to fill them."""
    staged = []
    for name, tensors in planned.fmt.files(planned.plan, planned.conf.output_format).items():
        path = out.staging(name)
        try:
            offsets = planned.fmt.create(path, tensors)
        except OSError as e:
            raise output_error(planned.output, e) from e
        staged.append(Staged(name, path, tensors, offsets))
    offsets = {n: (s.name, o) for s in staged for n, o in s.offsets.items()}
    # Blocks allocated up front for a lone run, not for tasks sharing it (see filler).
    return staged, out.filler(offsets, allocate=not group.shared)


def _fill(planned: _Planned, filler: Filler, sources: Collection[str], group: TaskGroup) -> Filled:
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


def _with_answers(filled: Filled, group: TaskGroup) -> Filled:
    """The lead's own work with what the other tasks wrote and read."""
    answers = group.answers()
    check_answers(answers, group)
    regions = {name: list(rs) for name, rs in filled.regions.items()}
    digests = dict(filled.source_digests)
    nonfinite, underflowed = Counter(filled.nonfinite), Counter(filled.underflowed_to_zero)
    for answer in answers.values():
        for name, written in answer["regions"].items():
            regions[name] += [Region(*r) for r in written]
        digests.update(answer["digests"])
        nonfinite.update(answer["nonfinite"])
        underflowed.update(answer["underflowed_to_zero"])
    return Filled(regions, digests, dict(nonfinite), dict(underflowed))


def _fill_share(planned: _Planned, group: TaskGroup) -> tuple[Status, int]:
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


def fingerprint(planned: _Planned) -> dict[str, Any]:
    """Identifies a conversion: the same fingerprint means the same output bytes.

    Every file the output is read from is identified by its size and its version as the
    storage lists it (a local file's modification time in ns, an object's ETag), taken before
    its tensors are read: a file rewritten in place, even to the same size, has a new one, so
    the next run converts again. That costs one listing, whatever the checkpoint's size; the
    small ``.metadata``, read anyway, is also hashed."""
    index, conf = planned.index, planned.conf
    read = planned.fmt.reads_from_assets(planned.tokenizer_dir)
    assets = {**planned.assets, **{f"{n}{_READ_NOT_COPIED}": p for n, p in read.items()}}
    return {
        # A local folder by its real path: reached through a symbolic link, it is the same.
        "step_dir": (
            os.path.realpath(index.step_dir)
            if isinstance(index.storage, LocalStorage)
            else index.storage.display(index.step_dir)
        ),
        "metadata_xxh3_128": xxhash.xxh3_128_hexdigest(index.metadata_bytes),
        "files": {
            index.storage.name(path): {"bytes": info.size, index.storage.version_kind: info.version}
            for path, info in index.files.items()
        },
        "output_format": _plain(conf.output_format),
        "export_dtype": str(conf.experiment.export_dtype),
        "model": _plain(conf.experiment.model),
        "converter": package_versions()["titan2tune"],
        # The files copied in (tokenizer), and those read but not copied (the token ids of an
        # hf folder's config.json), by content: only for a format that reads any.
        **({"assets": {n: file_digest(p) for n, p in assets.items()}} if assets else {}),
    }


def _source_record(planned: _Planned, filled: Filled) -> dict[str, Any]:
    index, plan = planned.index, planned.plan
    storage = index.storage
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
        "bytes_read": sum(index.tensors[k].nbytes for k in filled.source_digests),
        # How the files are identified (mtime_ns locally; ETags in an object store, whose
        # objects are not hashed, as they are not downloaded whole) and, for an object store,
        # the bytes downloaded by this process.
        "storage": storage.describe(),
        # DCP keeps no checksums: the XXH3-128 of each tensor's bytes as read (row-major, the
        # dtype as saved) names any tensor whose bytes change later.
        "tensors": {
            key: {"bytes": index.tensors[key].nbytes, "xxh3_128": digest}
            for key, digest in sorted(filled.source_digests.items())
        },
    }


def _config_record(conf: ConvertConfig) -> dict[str, Any]:
    """The resolved config for the manifest, without the secrets of storage_options."""
    plain = _plain(conf)
    plain["experiment"]["storage_options"] = redacted(plain["experiment"]["storage_options"])
    return plain


def _plain(node: Any) -> Any:
    """A config dataclass as plain data (enums by value), for the manifest."""
    return OmegaConf.to_container(OmegaConf.structured(node), resolve=True, enum_to_str=True)


# -------------------------------------------------------------------- before any work


def _check_not_source(given: Path, output: Path, index: DcpIndex) -> None:
    """Refuses an output that is, links to, or lies beside the files of the source step."""
    step_dir = Path(index.step_dir).resolve()
    for source in map(Path, index.files):
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
    if step_dir.is_relative_to(output):
        raise ConversionError(
            f"experiment.output {given} holds the source step folder {step_dir}; replacing "
            "the output would delete the checkpoint. Choose another output path."
        )


def _check_not_folders(output: Path, fmt: OutputFormat) -> None:
    """Refuses, before any work, a folder where a file is to go (or a file where the folder
    output is to go), and a folder that holds a DCP checkpoint anywhere in it (a step folder,
    a run's checkpoint folder): no run replaces one, with overwrite=true or without."""
    if fmt.folder:
        if output.exists() and not output.is_dir():
            raise ConversionError(
                f"experiment.output {output} is a file; output_format={fmt.name} writes a "
                "folder, and the converter never replaces a file with one. Choose a folder "
                "path or remove the file, then run again."
            )
        if output.is_dir() and (saved := _checkpoint_files(output)):
            raise ConversionError(
                f"experiment.output {output} holds a DCP checkpoint ({', '.join(saved)}); "
                "replacing the output would delete it, and the converter never does, with "
                "overwrite=true or without. Choose another output folder."
            )
        return
    if output.is_dir():
        raise ConversionError(
            f"experiment.output {output} is a folder; the output is one file, and the converter "
            f"never replaces a folder. Choose a file path (such as {output / 'model.pt'}) or "
            "remove the folder, then run again."
        )
    for path in (
        manifest_path(output, False),
        *(output.with_name(n) for n in fmt.describe_names(output)),
    ):
        if path.is_dir():
            raise ConversionError(
                f"{path} is a folder, where the converter writes a file that describes "
                f"experiment.output {output}. Remove or rename the folder, or choose another "
                "experiment.output, then run again."
            )


def _checkpoint_files(folder: Path) -> list[str]:
    """The first few DCP index and shard files anywhere under ``folder`` (relative paths)."""
    found: list[str] = []
    for top, _, names in os.walk(folder):
        found += sorted(
            os.path.relpath(os.path.join(top, n), folder)
            for n in names
            if n == METADATA_FILE or n.endswith(".distcp")
        )
        if len(found) > 3:
            return [*found[:3], "..."]
    return found


def _already_done(planned: _Planned, print_: dict[str, Any]) -> bool:
    """True if the output holds this very conversion (and ``force`` is off); raises if it
    holds another and may not be replaced, saying what differs."""
    output, conf, folder = planned.output, planned.conf, planned.fmt.folder
    if not output.exists() or (folder and output.is_dir() and not any(output.iterdir())):
        return False  # nothing there, or an empty folder: nothing to lose
    previous = read_manifest(manifest_path(output, folder))
    same = (
        previous is not None
        and _comparable(previous.get("fingerprint"), print_) == print_
        and _written_here(previous, output)
    )
    # A file the store lists no version of could have changed unseen: never up to date.
    unversioned = sorted(name for name, seen in print_["files"].items() if "" in seen.values())
    if same and unversioned:
        log.info(
            "Converting %s again: the store lists no version (ETag, modification time) of %s, "
            "so a changed source could not be told from this one.",
            output,
            ", ".join(unversioned[:3]) + (" and more" if len(unversioned) > 3 else ""),
        )
        return False
    # The files themselves are checked too: an old manifest beside replaced bytes does not
    # count. Hashed once: the refusal below names what differs from the same pass.
    differ = mismatches(previous, output, folder) if same else None
    if same and not differ:
        if previous.get("nonfinite") and not conf.allow_nonfinite:
            if conf.overwrite:
                log.info("Replacing %s (overwrite=true): it holds NaN/Inf values.", output)
                return False
            raise ConversionError(
                f"Output {output} holds NaN/Inf values in {_tensors(len(previous['nonfinite']))}, "
                "written with allow_nonfinite=true (its manifest's nonfinite lists them), and "
                "this run does not allow them. Set allow_nonfinite=true to keep it as it is, "
                "or overwrite=true to convert again (which fails on those values)."
            )
        if conf.force:
            log.info("Converting %s again (force=true), though it is up to date.", output)
            return False
        if asked := _not_given(previous, conf):
            log.info("Converting %s again: this run asks for %s.", output, " and ".join(asked))
            return False
        return True
    if conf.overwrite:  # force=true only converts an up-to-date output again
        log.info("Replacing %s (overwrite=true).", output)
        return False
    if previous is None:
        why = (
            "with no manifest of ours (not written by this converter, or its manifest is gone, "
            "unreadable or edited)"
        )
    else:
        if differ is None:
            differ = mismatches(previous, output, folder)
        why = "but " + "; ".join(_differences(previous, print_, output, folder, differ))
    raise ConversionError(
        f"Output {output} already exists, {why}. Set overwrite=true to replace it, or choose "
        "another experiment.output."
    )


def _written_here(previous: dict[str, Any], output: Path) -> bool:
    """Whether the output on disk was written where it is: its recipe snippet names its own
    folder, so a moved or copied output would send torchtune to the old place."""
    written = str((previous.get("output") or {}).get("path", output))
    return os.path.realpath(written) == os.path.realpath(output)


_READ_NOT_COPIED = " (read, not copied)"


def _comparable(recorded: Any, now: dict[str, Any]) -> dict[str, Any] | None:
    """A recorded fingerprint as ``fingerprint`` makes one now (``now``). Before 2026-12-07 a
    local step folder was recorded as given (through any symbolic link), not by its real path,
    and the files read from the tokenizer folder but not copied were not recorded: those are
    taken as they are now, as that version did."""
    if not isinstance(recorded, dict):
        return None
    if (path := local_part(str(recorded.get("step_dir")))) is not None:
        recorded = {**recorded, "step_dir": os.path.realpath(path)}
    old = recorded.get("assets")
    if isinstance(old, dict) and not any(k.endswith(_READ_NOT_COPIED) for k in old):
        read = {k: v for k, v in now.get("assets", {}).items() if k.endswith(_READ_NOT_COPIED)}
        recorded = {**recorded, "assets": {**old, **read}}
    return recorded


def _not_given(previous: dict[str, Any], conf: ConvertConfig) -> list[str]:
    """What this run asks of its output that the same conversion on disk was not given."""
    was = previous.get("config") or {}
    asked = []
    if conf.verify and not was.get("verify"):
        asked.append("verify=true (it was written with verify=false, and never read back)")
    recorded = [
        *previous["output"]["files"].values(),
        *previous["output"].get("sidecars", {}).values(),
    ]
    if conf.sha256 and not all("sha256" in f for f in recorded):
        asked.append("sha256=true (its manifest records no sha256)")
    return asked


def _differences(
    previous: dict[str, Any], print_: dict[str, Any], output: Path, folder: bool, differ: list[str]
) -> list[str]:
    """What makes the conversion on disk another than this one, in a user's words (``differ``:
    how its files differ from its manifest, see ``mismatches``)."""
    old = _comparable(previous.get("fingerprint"), print_) or {}
    found = []
    if old.get("step_dir") != print_["step_dir"]:
        was = (previous.get("source") or {}).get("step_dir") or old.get("step_dir")
        found.append(f"it was converted from {was}, this run reads {print_['step_dir']}")
    for key in ("output_format", "export_dtype", "model"):
        for field, (was, now) in _changed_fields(key, old.get(key), print_[key]).items():
            found.append(f"its {field} was {was}, this run's is {now}")
    was, now = old.get("assets") or {}, print_.get("assets") or {}
    if was != now:
        changed = sorted(n for n in {*was, *now} if was.get(n) != now.get(n))
        found.append(
            f"the files it took from the tokenizer folder differ now ({', '.join(changed)}; "
            "experiment.tokenizer_dir)"
        )
    if old.get("step_dir") == print_["step_dir"]:
        changed = sorted(
            name for name, seen in print_["files"].items() if old.get("files", {}).get(name) != seen
        )
        changed += sorted(set(old.get("files", {})) - set(print_["files"]))
        if changed or old.get("metadata_xxh3_128") != print_["metadata_xxh3_128"]:
            what = ", ".join(changed) or ".metadata"
            found.append(f"the source files changed since it was converted ({what})")
    if not _written_here(previous, output):
        found.append(
            f"it was written at {previous['output']['path']} and moved or copied here, where "
            "its recipe snippet (checkpoint_dir) still names the old place"
        )
    if old.get("converter") != print_["converter"]:
        found.append(f"it was written by titan2tune {old.get('converter')}")
    if differ:
        found.append(
            f"its files no longer match its manifest {manifest_path(output, folder)} "
            f"({', '.join(differ)})"
        )
    return found or ["it was written with other settings"]


def _changed_fields(name: str, old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """The dotted fields of two settings (nested dicts) that differ: name -> (old, new)."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed = {}
        for key in [*old, *(k for k in new if k not in old)]:
            changed |= _changed_fields(f"{name}.{key}", old.get(key), new.get(key))
        return changed
    return {} if old == new else {name: (old, new)}


def _size(output: Path) -> int:
    if output.is_dir():
        return sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    return output.stat().st_size
