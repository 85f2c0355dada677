"""Reading the output back as torchtune does and checking it against what was converted.

The check loads the finished file with ``torch.load(mmap=True, weights_only=True)``, exactly as
torchtune's checkpointers do, and compares keys, order, shapes and dtypes with the plan. Then it
reads every written byte range where that load places each tensor and compares its XXH3 digest with
the one taken of the cast source data as it was written. That is bit-exact against the source
after the cast without reading the source a second time. The manifest needs the file's sha256
anyway, so both come from one read of the file: verifying adds the XXH3 (~10 GB/s) to a pass
that is made in any case."""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from converter.engine import Region
from converter.errors import ConversionError
from converter.hashing import sha256_file
from converter.mapping import Plan
from converter.sink import record_offsets
from converter.source import DcpCheckpoint

_WINDOW = 16 << 20


def read_back(
    path: Path,
    plan: Plan,
    checkpoint: DcpCheckpoint,
    regions: dict[str, list[Region]] | None,
) -> str:
    """The sha256 of the finished file, for its manifest, and with ``regions`` (what the
    conversion wrote, ``verify=true``) the checks above, all in one pass over the file. The
    check that tied embeddings are tied (see ``_check_tied``) runs in either case."""
    if regions is None:
        # Not a check of the write, but of the settings: it holds with or without verify.
        if plan.tied:
            _check_tied(plan, checkpoint, _load(path))
        return sha256_file(path)
    loaded = _load(path)
    try:
        offsets = record_offsets(path, loaded)
    except Exception as e:
        raise _mismatch(path, f"its storage records cannot be read: {e}") from e
    if not isinstance(loaded, dict) or list(loaded) != [t.name for t in plan.tensors]:
        raise _mismatch(path, "its keys differ from the planned ones")
    spans = []
    for spec in plan.tensors:
        tensor = loaded[spec.name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise _mismatch(
                path,
                f"{spec.name!r} is {tensor.dtype}{tuple(tensor.shape)}, "
                f"expected {spec.dtype}{spec.shape}",
            )
        written = sorted(regions[spec.name], key=lambda r: r.start)
        # Contiguous from byte 0 to the end: each region starts where the previous ended.
        ends = [0] + [r.start + r.length for r in written]
        gaps = any(r.start != end for r, end in zip(written, ends[:-1], strict=True))
        if gaps or ends[-1] != tensor.nbytes:
            raise _mismatch(path, f"{spec.name!r} was not written exactly once in full")
        spans += [_Span(offsets[spec.name] + r.start, r, spec.name) for r in written if r.length]
    digest = _scan(path, sorted(spans, key=lambda s: s.at))
    _check_tied(plan, checkpoint, loaded)
    return digest


def _load(path: Path) -> dict[str, torch.Tensor]:
    """The file as torchtune loads it: mapped, so that only the bytes looked at are read."""
    try:
        return torch.load(path, mmap=True, weights_only=True)
    except Exception as e:
        raise _mismatch(path, f"it does not load with torch.load(weights_only=True): {e}") from e


@dataclass(frozen=True)
class _Span:
    """A written region where it lies in the file."""

    at: int
    region: Region
    name: str


def _scan(path: Path, spans: list[_Span]) -> str:
    """Reads the file once, in order: returns its sha256 and checks the XXH3 digest of each of
    ``spans`` (sorted, disjoint). Through a mapping of one window at a time, as ``sha256_file``
    does: no copy of the bytes, and no more of the file resident than a window."""
    file_hash, span_hash = hashlib.sha256(), xxhash.xxh3_64()
    first = 0  # the first span not checked yet
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for pos in range(0, size, _WINDOW):
            end = min(pos + _WINDOW, size)
            window = mmap.mmap(f.fileno(), end - pos, offset=pos, access=mmap.ACCESS_READ)
            with window, memoryview(window) as view:
                file_hash.update(view)
                for span in spans[first:]:
                    if span.at >= end:
                        break
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


def _check_tied(plan: Plan, checkpoint: DcpCheckpoint, loaded: dict[str, torch.Tensor]) -> None:
    """With ``tied_embeddings=true``, a head saved beside the embeddings must hold their values
    (after the cast): torchtune ties the two on load, so a file that left out (or kept) a
    different head would silently load as another model. Runs whatever ``verify`` says, one
    row run of the head at a time against the mapped file's embeddings: bounded memory."""
    for source_key, name in plan.tied:
        entry, written_tensor = checkpoint.tensors[source_key], loaded[name]
        if entry.shape != tuple(written_tensor.shape) or not all(
            torch.equal(
                part.load(torch.empty(part.nbytes, dtype=torch.uint8)).to(written_tensor.dtype),
                written_tensor[part.start : part.stop],
            )
            for part in checkpoint.parts(entry)
        ):
            raise ConversionError(
                f"experiment.model.tied_embeddings=true, but {source_key!r} in "
                f"{checkpoint.step_dir} differs from the embeddings written as {name!r}: the "
                "model does not tie them. Set experiment.model.tied_embeddings=false."
            )


def _mismatch(path: Path, what: str) -> ConversionError:
    return ConversionError(
        f"Verification of {path} failed: {what}. The file was not kept. This points at a "
        "storage fault while writing; run again, and report it if it persists."
    )
