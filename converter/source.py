"""Reading a torchtitan DCP step folder: finding it, validating it, and streaming its chunks.

DCP stores each saved chunk (an FSDP2/TP shard of a tensor) as a small ``torch.save`` blob at
an offset inside a ``__<rank>_<i>.distcp`` file, and indexes them in the pickled ``.metadata``.
We read that index ourselves rather than calling ``dcp.load`` so that a conversion can pull one
chunk at a time, in any order, from several threads, and skip the optimizer state unread: peak
memory is then one chunk per worker, whatever the checkpoint's size.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from converter.archive import storage_records
from converter.errors import ConversionError

log = logging.getLogger(__name__)

METADATA_FILE = ".metadata"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor and where its ``torch.save`` blob lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: Path
    offset: int
    length: int


@dataclass(frozen=True)
class TensorEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_chunked(self) -> bool:
        """True when every chunk holds whole rows (FSDP2 shards dim 0), so each one can be
        streamed on its own; TP-style chunks across columns need the tensor assembled first."""
        return all(c.offsets[1:] == (0,) * (len(self.shape) - 1) for c in self.chunks) and all(
            c.sizes[1:] == self.shape[1:] for c in self.chunks
        )


@dataclass(frozen=True)
class RowPart:
    """Rows ``[start, stop)`` of a tensor and how to load them."""

    start: int
    stop: int
    nbytes: int  # the buffer size that ``load`` needs
    load: Callable[[torch.Tensor], torch.Tensor]


def list_steps(checkpoint_dir: Path) -> dict[int, Path]:
    """The ``step-<N>`` folders of a torchtitan checkpoint folder, complete or not."""
    steps = {}
    for child in checkpoint_dir.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            steps[int(m.group(1))] = child
    return dict(sorted(steps.items()))


def find_step_dir(checkpoint_dir: Path, step: int | str) -> tuple[int, Path]:
    """Resolves ``step`` (a number or ``latest``) to a step folder with a finished save."""
    if not checkpoint_dir.exists():
        raise ConversionError(
            f"Checkpoint folder {checkpoint_dir} does not exist. Set experiment.checkpoint_dir "
            "to the folder that holds the step-<N> folders (torchtitan's "
            "<dump_folder>/<checkpoint.folder>)."
        )
    if not checkpoint_dir.is_dir():
        raise ConversionError(
            f"experiment.checkpoint_dir {checkpoint_dir} is a file, not a folder; point it at "
            "the folder that holds the step-<N> folders."
        )
    steps = list_steps(checkpoint_dir)
    if not steps:
        found = sorted(p.name for p in checkpoint_dir.iterdir())[:10]
        raise ConversionError(
            f"{checkpoint_dir} is not a torchtitan checkpoint folder: it has no step-<N> "
            f"folders (it holds {found or 'nothing'}). Point experiment.checkpoint_dir at "
            "<dump_folder>/<checkpoint.folder> of the run."
        )
    complete = {n: p for n, p in steps.items() if (p / METADATA_FILE).is_file()}
    if step == "latest":
        if not complete:
            raise ConversionError(
                f"No finished save in {checkpoint_dir}: none of {[p.name for p in steps.values()]}"
                f" has a {METADATA_FILE} file (each save was interrupted). Re-run the save."
            )
        chosen = max(complete)
        unfinished = [n for n in steps if n > chosen]
        if unfinished:
            log.warning(
                "step-%s in %s has no %s (an unfinished save); using the newest complete "
                "save, step-%s.",
                max(unfinished),
                checkpoint_dir,
                METADATA_FILE,
                chosen,
            )
        return chosen, complete[chosen]
    assert isinstance(step, int)
    if step not in steps:
        raise ConversionError(
            f"{checkpoint_dir} has no step-{step} folder; the steps saved there are "
            f"{list(steps)}. Set experiment.step to one of them, or to latest."
        )
    if step not in complete:
        raise ConversionError(
            f"{steps[step]} has no {METADATA_FILE} file: that save did not finish. Choose a "
            f"complete step ({list(complete) or 'none'}) or experiment.step=latest."
        )
    return step, steps[step]


class DcpCheckpoint:
    """A validated DCP step folder: its index and the means to read any chunk of it."""

    def __init__(self, step_dir: Path) -> None:
        self.step_dir = step_dir
        self.metadata_path = step_dir / METADATA_FILE
        metadata = self._read_metadata()
        self.tensors: dict[str, TensorEntry] = {}
        self.byte_entries: list[str] = []
        shard_extent: dict[Path, int] = {}
        for key, md in metadata.state_dict_metadata.items():
            if isinstance(md, BytesStorageMetadata):
                self.byte_entries.append(key)
                continue
            if not isinstance(md, TensorStorageMetadata):
                raise self._unknown_format(f"entry {key!r} is a {type(md).__name__}")
            chunks = []
            for c in md.chunks:
                info = metadata.storage_data.get(MetadataIndex(key, c.offsets))
                if info is None:
                    raise self._unknown_format(f"no storage record for a chunk of {key!r}")
                if getattr(info, "transform_descriptors", None):
                    raise ConversionError(
                        f"{self.metadata_path}: {key!r} was saved through DCP stream "
                        f"extensions {info.transform_descriptors} (e.g. compression), which "
                        "this converter does not read. Re-save without them."
                    )
                path = step_dir / info.relative_path
                shard_extent[path] = max(shard_extent.get(path, 0), info.offset + info.length)
                chunks.append(
                    Chunk(tuple(c.offsets), tuple(c.sizes), path, info.offset, info.length)
                )
            self.tensors[key] = TensorEntry(key, md.properties.dtype, tuple(md.size), tuple(chunks))
        self.shard_sizes = self._check_shards(shard_extent)

    def _read_metadata(self) -> Metadata:
        try:
            with open(self.metadata_path, "rb") as f:
                metadata = pickle.load(f)
        except Exception as e:  # pickle raises a zoo of types on damaged input
            raise ConversionError(
                f"Cannot read {self.metadata_path} ({type(e).__name__}: {e}). The file is "
                "truncated or damaged, so the save did not finish cleanly; convert another "
                "step (experiment.step) or re-save this one."
            ) from e
        if not isinstance(metadata, Metadata) or not isinstance(
            getattr(metadata, "state_dict_metadata", None), dict
        ):
            raise self._unknown_format(f"it holds a {type(metadata).__name__}")
        return metadata

    def _unknown_format(self, what: str) -> ConversionError:
        return ConversionError(
            f"{self.metadata_path} is not a torch.distributed.checkpoint index this converter "
            f"understands ({what}). Check that {self.step_dir} is a DCP save written by "
            "torchtitan with torch >= 2.4."
        )

    def _check_shards(self, extent: dict[Path, int]) -> dict[Path, int]:
        sizes = {}
        for path, needed in sorted(extent.items()):
            if not path.is_file():
                raise ConversionError(
                    f"Shard file {path} named by {self.metadata_path} is missing: the checkpoint "
                    "is incomplete (a rank's files were not copied?). Copy the whole step folder "
                    "again or convert another step."
                )
            size = path.stat().st_size
            if size < needed:
                raise ConversionError(
                    f"Shard file {path} is truncated: {size} bytes, but {self.metadata_path} "
                    f"places data up to byte {needed}. Copy the step folder again or convert "
                    "another step."
                )
            sizes[path] = size
        return sizes

    def read_chunk(
        self, entry: TensorEntry, chunk: Chunk, buffer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loads one chunk, checked against the index, in its stored dtype.

        The blob is read in two steps so that its bytes are copied once, from the file straight
        into ``buffer`` (a uint8 tensor of at least ``chunk.length`` bytes, reused by the caller;
        a fresh one if None): ``torch.load`` under ``skip_data`` builds the tensor's metadata
        (dtype, shape, strides) from the blob's pickle without its bytes, then the blob's one
        storage record is read into the buffer and the tensor is laid over it.
        """
        if buffer is None:
            buffer = torch.empty(chunk.length, dtype=torch.uint8)
        try:
            with open(chunk.path, "rb", buffering=0) as f:
                window = _FileWindow(f, chunk.offset, chunk.length)
                with torch.serialization.skip_data():
                    meta = torch.load(window, map_location="cpu", weights_only=True)
                records = storage_records(window)
                if len(records) != 1:
                    raise ValueError(f"{len(records)} storage records in a one-tensor blob")
                [(start, length)] = records
                if length != meta.untyped_storage().nbytes() or length > buffer.numel():
                    raise ValueError(f"a storage record of {length} bytes does not fit")
                window.seek(start)
                if window.readinto(buffer[:length].numpy()) != length:
                    raise EOFError("the storage record ends early")
        except Exception as e:
            raise ConversionError(
                f"Cannot read chunk {chunk.offsets} of {entry.key!r} from {chunk.path} at byte "
                f"{chunk.offset} ({type(e).__name__}: {e}). The shard file is damaged; copy "
                "the step folder again or convert another step."
            ) from e
        if tuple(meta.shape) != chunk.sizes or meta.dtype != entry.dtype:
            raise ConversionError(
                f"Chunk {chunk.offsets} of {entry.key!r} in {chunk.path} does not match "
                f"{self.metadata_path} (expected {entry.dtype} of shape {chunk.sizes}). The "
                "shard file and the index come from different saves; copy the step folder again."
            )
        assert buffer.storage_offset() == 0
        return (
            buffer[:length]
            .view(meta.dtype)
            .as_strided(meta.shape, meta.stride(), meta.storage_offset())
        )

    def parts(self, entry: TensorEntry) -> list[RowPart]:
        """The tensor as runs of whole rows in order, each loadable on its own."""
        if entry.row_chunked:
            return [
                RowPart(
                    c.offsets[0],
                    c.offsets[0] + c.sizes[0],
                    c.length,
                    partial(self.read_chunk, entry, c),
                )
                for c in sorted(entry.chunks, key=lambda c: c.offsets)
                if c.sizes[0]
            ]
        return [RowPart(0, entry.shape[0], entry.nbytes, partial(self.read_tensor, entry))]

    def read_tensor(self, entry: TensorEntry, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Assembles a whole tensor from its chunks (for chunks that are not whole rows)."""
        if buffer is None:
            buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        out = buffer[: entry.nbytes].view(entry.dtype).view(entry.shape)
        for chunk in entry.chunks:
            view = out
            for dim, (start, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                view = view.narrow(dim, start, size)
            view.copy_(self.read_chunk(entry, chunk))
        return out


class _FileWindow(io.RawIOBase):
    """A read-only, seekable view of ``length`` bytes at ``start`` of an open file, so that
    ``torch.load`` can read one blob inside a ``.distcp`` file without copying it out first."""

    def __init__(self, f: io.RawIOBase, start: int, length: int) -> None:
        self._fd = f.fileno()
        self._start = start
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self._length - self._pos))
        view = memoryview(buffer).cast("B")[:n]
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], self._start + self._pos + done)
            if got == 0:
                break
            done += got
        self._pos += done
        return done
