"""Reading the output back, and checking it against what was converted.

One pass over each finished file gives its XXH3-128 digest for the manifest and, with
``verify=true``, checks every written byte (sha256, when asked for, takes a pass of its own
beside it). For the check the file is first loaded as its consumer loads it
(``torch.load(mmap=True, weights_only=True)`` for a ``.pt``, safetensors' ``safe_open`` for a
shard), its names, shapes and dtypes compared with the plan, and then every byte range the
conversion wrote is read where that load places it and its XXH3 digest compared with the one
taken of the cast source data as it was written: bit-exact against the source after the cast,
without reading the source a second time.

The check that tied embeddings are tied runs whatever ``verify`` says: it is a check of the
settings, not of the write.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from converter.digests import ALGORITHMS, file_digest, pieces
from converter.engine import Region
from converter.errors import ConversionError
from converter.formats.base import OutputFormat
from converter.plan import OutputTensor, Plan
from converter.sources.reader import TensorReader


@dataclass(frozen=True)
class Staged:
    """One file of the output, built under its partial name."""

    name: str  # its name in the output ("" for a one-file output)
    path: Path
    tensors: list[OutputTensor]
    offsets: dict[str, int]  # where each tensor's bytes start in it


def read_back(
    fmt: OutputFormat,
    files: list[Staged],
    plan: Plan,
    reader: TensorReader,
    regions: Mapping[str, list[Region]] | None,
    sha256: bool,
    workers: int,
) -> dict[str, dict[str, str | int]]:
    """Each file's size and digests (``regions``, what the conversion wrote, given: checked as
    above), the files side by side on ``workers`` threads (the hashing releases the GIL), and
    sha256, when asked for, in passes of its own beside them: it hashes several times slower.
    The files are in the page cache, just written, so a pass costs memory bandwidth, not a
    read of the disk."""
    _check_tied(plan, files, reader)
    xxh3, sha = ALGORITHMS
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = {
            staged.name: {
                xxh3: pool.submit(_read_file, fmt, staged, regions),
                **({sha: pool.submit(file_digest, staged.path, sha)} if sha256 else {}),
            }
            for staged in files
        }
        return {
            staged.name: {
                "bytes": staged.path.stat().st_size,
                **{a: f.result() for a, f in found[staged.name].items()},
            }
            for staged in files
        }


def _read_file(
    fmt: OutputFormat, staged: Staged, regions: Mapping[str, list[Region]] | None
) -> str:
    """The file's XXH3-128 digest. With ``regions``, the file first loads as its consumer
    loads it and holds the planned tensors, and the same pass checks that every byte range
    written holds the digest taken as it was written."""
    spans = []
    if regions is not None:
        try:
            offsets = fmt.read_back(staged.path, staged.tensors)
        except ValueError as e:
            raise _mismatch(staged.path, str(e)) from e
        for spec in staged.tensors:
            spans += _spans(staged.path, spec, offsets[spec.name], regions[spec.name])
    return _scan(staged.path, sorted(spans, key=lambda s: s.at))


@dataclass(frozen=True)
class _Span:
    """A written region where it lies in the file."""

    at: int
    region: Region
    name: str


def _spans(path: Path, spec: OutputTensor, offset: int, written: list[Region]) -> list[_Span]:
    """The regions written into ``spec``, which must cover it exactly once, from byte 0 on."""
    written = sorted(written, key=lambda r: r.start)
    ends = [0] + [r.start + r.length for r in written]
    gaps = any(r.start != end for r, end in zip(written, ends[:-1], strict=True))
    nbytes = spec.dtype.itemsize * _numel(spec.shape)
    if gaps or ends[-1] != nbytes:
        raise _mismatch(path, f"{spec.name!r} was not written exactly once in full")
    return [_Span(offset + r.start, r, spec.name) for r in written if r.length]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _scan(path: Path, spans: list[_Span]) -> str:
    """The file's XXH3-128 digest, and the XXH3-64 digest of each of ``spans`` (sorted,
    disjoint) checked, in one pass: each piece hashed for both while it is in cache."""
    file_hash, span_hash = xxhash.xxh3_128(), xxhash.xxh3_64()
    first = 0  # the first span not checked yet
    for pos, view in pieces(path):
        file_hash.update(view)
        end = pos + len(view)
        while first < len(spans) and spans[first].at < end:
            span = spans[first]
            stop = span.at + span.region.length
            span_hash.update(view[max(span.at, pos) - pos : min(stop, end) - pos])
            if stop > end:
                break
            first += 1
            if span_hash.intdigest() != span.region.digest:
                r, name = span.region, span.name
                raise _mismatch(path, f"bytes {r.start}..{r.start + r.length} of {name!r}")
            span_hash.reset()
    if first != len(spans):
        raise _mismatch(path, "it ends before the last tensor's bytes")
    return file_hash.hexdigest()


def _check_tied(plan: Plan, files: list[Staged], reader: TensorReader) -> None:
    """With ``tied_embeddings=true``, a head saved beside the embeddings must hold their values
    (after the cast): the consumer ties the two on load, so a file that left out (or kept) a
    different head would silently load as another model. Compared a window of rows at a time,
    the head from the source, the embeddings from the file written: bounded memory."""
    where = {t.name: (f, t) for f in files for t in f.tensors}
    for source_key, name in plan.tied:
        entry = reader.index.tensors[source_key]
        staged, written = where[name]
        rows, width = entry.rows
        if written.shape != entry.shape:
            raise _untied(source_key, name, reader)
        row_out = width * written.dtype.itemsize
        step = max(1, (16 << 20) // max(entry.row_bytes, 1))
        with open(staged.path, "rb") as f:
            for lo in range(0, rows, step):
                hi = min(lo + step, rows)
                buffer = torch.empty(reader.buffer_bytes(entry, hi - lo), dtype=torch.uint8)
                head = reader.read_rows(entry, lo, hi, buffer).to(written.dtype)
                got = torch.empty((hi - lo) * row_out, dtype=torch.uint8)
                f.seek(staged.offsets[name] + lo * row_out)
                f.readinto(got.numpy())
                if not torch.equal(head.view(torch.uint8).reshape(-1), got):
                    raise _untied(source_key, name, reader)


def _untied(source_key: str, name: str, reader: TensorReader) -> ConversionError:
    step_dir = reader.storage.display(reader.index.step_dir)
    return ConversionError(
        f"experiment.model.tied_embeddings=true, but {source_key!r} in {step_dir} differs from "
        f"the embeddings written as {name!r}: the model does not tie them. Set "
        "experiment.model.tied_embeddings=false."
    )


def _mismatch(path: Path, what: str) -> ConversionError:
    return ConversionError(
        f"Verification of {path} failed: {what}. The file was not kept. This points at a "
        "storage fault while writing; run again, and report it if it persists."
    )
