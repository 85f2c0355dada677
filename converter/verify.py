"""Reading the output back as torchtune does and checking it against what was converted.

The check loads the finished file with ``torch.load(mmap=True, weights_only=True)``, exactly as
torchtune's checkpointers do, and compares keys, order, shapes and dtypes with the plan. Then it
reads every written byte range where that load places each tensor and compares its XXH3 digest with
the one taken of the cast source data as it was written. That is bit-exact against the source
after the cast without reading the source a second time, so verifying costs one pass over the
output rather than doubling the run. Bytes are read with ``pread`` into a small buffer, not
through the mapping, so verifying a large file does not grow the process's resident memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import xxhash

from converter.engine import Region
from converter.errors import ConversionError
from converter.mapping import Plan
from converter.sink import record_offsets
from converter.source import DcpCheckpoint

_BLOCK = 16 << 20


def verify_output(
    path: Path, plan: Plan, regions: dict[str, list[Region]], checkpoint: DcpCheckpoint
) -> None:
    try:
        loaded = torch.load(path, mmap=True, weights_only=True)
        offsets = record_offsets(path, loaded)
    except Exception as e:
        raise _mismatch(path, f"it does not load with torch.load(weights_only=True): {e}") from e
    if not isinstance(loaded, dict) or list(loaded) != [t.name for t in plan.tensors]:
        raise _mismatch(path, "its keys differ from the planned ones")
    fd = os.open(path, os.O_RDONLY)
    try:
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
            for r in written:
                if _digest(fd, offsets[spec.name] + r.start, r.length) != r.digest:
                    raise _mismatch(path, f"bytes {r.start}..{r.start + r.length} of {spec.name!r}")
    finally:
        os.close(fd)
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


def _digest(fd: int, offset: int, length: int) -> int:
    hasher, buffer = xxhash.xxh3_64(), bytearray(min(length, _BLOCK))
    view = memoryview(buffer)
    while length:
        got = os.preadv(fd, [view[: min(length, _BLOCK)]], offset)
        if not got:
            break
        hasher.update(view[:got])
        offset, length = offset + got, length - got
    return hasher.intdigest()


def _mismatch(path: Path, what: str) -> ConversionError:
    return ConversionError(
        f"Verification of {path} failed: {what}. The file was not kept. This points at a "
        "storage fault while writing; run again, and report it if it persists."
    )
