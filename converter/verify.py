"""Reading the output back as torchtune does and checking it against what was converted.

The check loads the finished file with ``torch.load(mmap=True, weights_only=True)``, exactly as
torchtune's checkpointers do, and compares keys, order, shapes and dtypes with the plan, then
every written byte range with the CRC-32 taken of the cast source data as it was written. That
makes the read-back bit-exact against the source after the cast without reading the source a
second time, so verifying costs one pass over the output rather than doubling the run.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from converter.engine import Region
from converter.errors import ConversionError
from converter.mapping import Plan
from converter.source import DcpCheckpoint


def verify_output(
    path: Path, plan: Plan, regions: dict[str, list[Region]], checkpoint: DcpCheckpoint
) -> None:
    try:
        loaded = torch.load(path, mmap=True, weights_only=True)
    except Exception as e:
        raise _mismatch(path, f"torch.load(weights_only=True) fails: {e}") from e
    if not isinstance(loaded, dict) or list(loaded) != [t.name for t in plan.tensors]:
        raise _mismatch(path, "its keys differ from the planned ones")
    for spec in plan.tensors:
        tensor = loaded[spec.name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise _mismatch(
                path, f"{spec.name!r} is {tensor.dtype}{tuple(tensor.shape)}, "
                f"expected {spec.dtype}{spec.shape}"
            )
        written = sorted(regions[spec.name], key=lambda r: r.start)
        if sum(r.length for r in written) != tensor.nbytes or any(
            a.start + a.length != b.start for a, b in zip(written, written[1:])
        ):
            raise _mismatch(path, f"{spec.name!r} was not written exactly once in full")
        raw = tensor.view(torch.uint8).reshape(-1).numpy() if tensor.nbytes else None
        for r in written:
            if zlib.crc32(raw[r.start : r.start + r.length]) != r.crc32:
                raise _mismatch(path, f"bytes {r.start}..{r.start + r.length} of {spec.name!r}")
    for source_key, name in plan.tied:
        entry, written = checkpoint.tensors[source_key], loaded[name]
        if entry.shape != tuple(written.shape) or not all(
            torch.equal(part.load().to(written.dtype), written[part.start : part.stop])
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
