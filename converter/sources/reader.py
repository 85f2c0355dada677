"""Reading any rows of a checkpoint tensor, from the chunks that hold them.

A tensor is read in windows of whole rows (``converter.plan``). Each stored chunk covers a
rectangle of the tensor; in the row view it is one or more runs of rows, each ``width`` values
wide from column ``column``. FSDP2 and expert parallelism shard dim 0, so a chunk is usually one
run of full rows, whose bytes are read straight into their place in the window: one copy, from
the storage into the caller's buffer. A chunk of some columns only (tensor parallelism,
``Shard(1)``) is read a run at a time into the buffer's spare half, then copied into its
columns. Either way the window, not the chunk or the tensor, bounds the memory.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Collection
from dataclasses import dataclass

import torch

from converter.errors import ConversionError, environment_error
from converter.sources.dcp import Chunk, DcpIndex, TensorEntry
from converter.sources.storage import Storage
from converter.torch_archive import NotATensorArchive, StoredTensor, stored_tensor

# An archive's layout lies in its first and last few KiB (the pickle and the central directory).
_ARCHIVE_END_BYTES = 4096
# Chunks whose archives' ends are read in one batch: bounds that batch's memory (8 KiB each).
_PREFETCH_CHUNKS = 1024


@dataclass(frozen=True)
class _Read:
    """Bytes of ``chunk``'s shard file from ``offset``, to read into ``into``."""

    chunk: Chunk
    offset: int
    into: torch.Tensor


@dataclass(frozen=True)
class _Run:
    """Rows ``[row, row + count)`` of a tensor, held by ``chunk`` from its row ``chunk_row``,
    in values ``[column, column + width)`` of each row."""

    chunk: Chunk
    chunk_row: int
    row: int
    count: int
    column: int
    width: int


class TensorReader:
    """Reads rows of the tensors of one validated DCP index."""

    def __init__(self, index: DcpIndex) -> None:
        self.index = index
        self.storage = index.storage
        self._layouts: dict[Chunk, StoredTensor] = {}
        self._runs: dict[str, list[_Run]] = {}

    # ---------------------------------------------------------------- what a window needs

    def buffer_bytes(self, entry: TensorEntry, rows: int) -> int:
        """The buffer that :meth:`read_rows` needs for ``rows`` rows of ``entry``."""
        staged = any(r.width != entry.rows[1] for r in self.runs(entry))
        return rows * entry.row_bytes * (2 if staged else 1)

    def runs(self, entry: TensorEntry) -> list[_Run]:
        """The runs of rows of ``entry``'s chunks, in row order."""
        if entry.key not in self._runs:
            runs = [run for chunk in entry.chunks for run in _chunk_runs(entry.shape, chunk)]
            self._runs[entry.key] = sorted(runs, key=lambda r: (r.row, r.column))
        return self._runs[entry.key]

    # ---------------------------------------------------------------- reading

    def read_rows(
        self, entry: TensorEntry, start: int, stop: int, buffer: torch.Tensor
    ) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``entry`` as a ``[rows, values]`` tensor of its stored
        dtype, laid over ``buffer`` (uint8, at least :meth:`buffer_bytes` long). The reads of
        all the chunks the window spans go to the storage as one batch."""
        width = entry.rows[1]
        mapped = self._mapped(entry, start, stop)
        if mapped is not None:
            return mapped
        nbytes = (stop - start) * entry.row_bytes
        window = buffer[:nbytes].view(entry.dtype).view(stop - start, width)
        spare, used = buffer[nbytes:], 0
        reads: list[_Read] = []
        staged: list[tuple[torch.Tensor, int, int, _Run]] = []
        for run in self.runs(entry):
            if run.row >= stop:
                break
            lo, hi = max(start, run.row), min(stop, run.row + run.count)
            if lo >= hi:
                continue
            rows = (run.chunk_row + lo - run.row, run.chunk_row + hi - run.row)
            if run.width == width:
                target = window[lo - start : hi - start]
            else:  # some columns: read into the spare half, copied into place below
                size = (hi - lo) * run.width * entry.dtype.itemsize
                target = spare[used : used + size].view(entry.dtype).view(hi - lo, run.width)
                used += size
                staged.append((target, lo, hi, run))
            read = self._chunk_rows(entry, run.chunk, rows, target)
            if read is not None:
                reads.append(read)
        self._read(entry, reads)
        for part, lo, hi, run in staged:
            window[lo - start : hi - start, run.column : run.column + run.width].copy_(part)
        return window

    def _mapped(self, entry: TensorEntry, start: int, stop: int) -> torch.Tensor | None:
        """Rows ``[start, stop)`` as a view of the page cache, when one run of full rows of a
        plainly stored chunk holds them all and the storage maps files: no copy at all."""
        run = next((r for r in self.runs(entry) if r.row <= start < r.row + r.count), None)
        if run is None or run.width != entry.rows[1] or stop > run.row + run.count:
            return None
        if start == stop or not entry.row_bytes:
            return None
        layout = self._layout(entry, run.chunk)
        if not layout.contiguous:
            return None
        first = run.chunk_row + start - run.row
        offset = run.chunk.offset + layout.data_start + first * entry.row_bytes
        view = self.storage.map(run.chunk.file, offset, (stop - start) * entry.row_bytes)
        if view is None:
            return None
        with warnings.catch_warnings():
            # The mapping is read-only, and nothing writes to the tensor laid over it.
            warnings.filterwarnings("ignore", "The given buffer is not writable")
            rows = torch.frombuffer(view, dtype=entry.dtype)
        return rows.view(stop - start, entry.rows[1])

    def read_tensor(self, entry: TensorEntry) -> torch.Tensor:
        """The whole tensor, in a buffer of its own (for checks on small tensors)."""
        rows = entry.rows[0]
        buffer = torch.empty(self.buffer_bytes(entry, rows), dtype=torch.uint8)
        return self.read_rows(entry, 0, rows, buffer).view(entry.shape)

    def prefetch(self, keys: Collection[str]) -> None:
        """Learns the layout of every chunk of ``keys``, a batch of chunks at a time: on a
        remote store the requests for their archives' first and last KiB are then in flight
        together, not one round trip after another as the workers come to each chunk."""
        todo = [
            (entry, chunk)
            for entry in (self.index.tensors[k] for k in keys)
            for chunk in entry.chunks
            if chunk not in self._layouts
        ]
        for i in range(0, len(todo), _PREFETCH_CHUNKS):
            group = todo[i : i + _PREFETCH_CHUNKS]
            ends = self._archive_ends([chunk for _, chunk in group])
            for (entry, chunk), found in zip(group, ends, strict=True):
                self._layout(entry, chunk, found)

    def _chunk_rows(
        self, entry: TensorEntry, chunk: Chunk, rows: tuple[int, int], into: torch.Tensor
    ) -> _Read | None:
        """The read of rows ``[rows)`` of ``chunk``'s own row view into ``into`` (contiguous);
        None if they were read here already."""
        layout = self._layout(entry, chunk)
        if not layout.contiguous:
            # A chunk stored as a view (strided, or at an offset in a larger storage): rare;
            # read its whole storage into a buffer of its own.
            whole = self._read_storage(entry, chunk, layout)
            flat = whole.reshape(-1, into.shape[1])
            into.copy_(flat[rows[0] : rows[1]])
            return None
        row_bytes = into.shape[1] * entry.dtype.itemsize
        start = chunk.offset + layout.data_start + rows[0] * row_bytes
        return _Read(chunk, start, into)

    def _read_storage(self, entry: TensorEntry, chunk: Chunk, layout: StoredTensor) -> torch.Tensor:
        storage = torch.empty(layout.data_length, dtype=torch.uint8)
        self._read(entry, [_Read(chunk, chunk.offset + layout.data_start, storage)])
        return storage.view(layout.dtype).as_strided(
            layout.shape, layout.stride, layout.storage_offset
        )

    def _read(self, entry: TensorEntry, reads: list[_Read]) -> None:
        views = [memoryview(read.into.view(torch.uint8).reshape(-1).numpy()) for read in reads]
        got = self.storage.read_batch(
            [(r.chunk.file, r.offset, v) for r, v in zip(reads, views, strict=True)]
        )
        for read, view, n in zip(reads, views, got, strict=True):
            if n != len(view):
                raise self._damaged(entry, read.chunk, EOFError("the storage record ends early"))

    def _archive_ends(self, chunks: list[Chunk]) -> list[tuple[bytes, bytes]]:
        """The first and last few KiB of each chunk's archive (all of it, if that small), as
        read (short at the end of a file): one batch for all."""
        reads = []
        for chunk in chunks:
            head, tail = _end_sizes(chunk.length)
            reads.append((chunk.file, chunk.offset, memoryview(bytearray(head))))
            reads.append(
                (chunk.file, chunk.offset + chunk.length - tail, memoryview(bytearray(tail)))
            )
        got = self.storage.read_batch(reads)
        parts = [view[:n].tobytes() for (_, _, view), n in zip(reads, got, strict=True)]
        return list(zip(parts[0::2], parts[1::2], strict=True))

    def _layout(
        self, entry: TensorEntry, chunk: Chunk, ends: tuple[bytes, bytes] | None = None
    ) -> StoredTensor:
        """What the chunk's archive says it holds, checked against the index (read once)."""
        layout = self._layouts.get(chunk)
        if layout is not None:
            return layout
        try:
            head, tail = ends or self._archive_ends([chunk])[0]
            layout = stored_tensor(_ArchiveView(self.storage, chunk, head, tail))
        except ConversionError:
            raise
        except (ImportError, MemoryError) as e:
            raise environment_error(
                f"Reading {entry.key!r} from {self.storage.display(chunk.file)}", e
            ) from e
        except Exception as e:  # zipfile and pickle raise many types on damaged bytes
            raise self._damaged(entry, chunk, e) from e
        if layout.shape != chunk.sizes or layout.dtype != entry.dtype:
            raise ConversionError(
                f"Chunk {chunk.offsets} of {entry.key!r} in {self.storage.display(chunk.file)} "
                f"does not match {self.storage.display(self.index.metadata_path)} (expected "
                f"{entry.dtype} of shape {chunk.sizes}). The shard file and the index come from "
                "different saves; copy the step folder again."
            )
        if layout.data_start + layout.data_length > chunk.length:
            raise self._damaged(entry, chunk, NotATensorArchive("its storage ends past the blob"))
        self._layouts[chunk] = layout
        return layout

    def _damaged(self, entry: TensorEntry, chunk: Chunk, e: BaseException) -> ConversionError:
        return ConversionError(
            f"Cannot read chunk {chunk.offsets} of {entry.key!r} from "
            f"{self.storage.display(chunk.file)} at byte {chunk.offset} ({type(e).__name__}: "
            f"{e}). The shard file is damaged; copy the step folder again or convert another step."
        )


def _chunk_runs(shape: tuple[int, ...], chunk: Chunk) -> list[_Run]:
    """The runs of rows that ``chunk`` holds of a tensor of ``shape``, in the row view."""
    if len(shape) < 2:
        offset = chunk.offsets[0] if shape else 0
        count = chunk.sizes[0] if shape else 1
        return [_Run(chunk, 0, offset, count, 0, 1)]
    sizes, offsets = chunk.sizes, chunk.offsets
    # Rows of the chunk that are consecutive in the tensor form a run: the last row dimension
    # always, and the ones before it while the chunk spans the tensor's whole extent there.
    inner = len(shape) - 2  # index of the last row dimension
    outer = inner
    while outer > 0 and sizes[outer] == shape[outer] and offsets[outer] == 0:
        outer -= 1
    count = math.prod(sizes[outer : inner + 1])
    strides = [math.prod(shape[d + 1 : inner + 1]) for d in range(inner + 1)]
    runs = []
    for i, index in enumerate(_indices(sizes[:outer])):
        row = sum((offsets[d] + index[d]) * strides[d] for d in range(outer))
        row += offsets[outer] * strides[outer]
        runs.append(_Run(chunk, i * count, row, count, offsets[-1], sizes[-1]))
    return runs


def _indices(sizes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every index of an array of ``sizes``, in row-major order (one empty index for none)."""
    out: list[tuple[int, ...]] = [()]
    for size in sizes:
        out = [(*index, i) for index in out for i in range(size)]
    return out


def _end_sizes(length: int) -> tuple[int, int]:
    """The bytes of an archive of ``length`` bytes to read from its start and from its end."""
    if length <= 2 * _ARCHIVE_END_BYTES:
        return length, 0
    return _ARCHIVE_END_BYTES, _ARCHIVE_END_BYTES


class _ArchiveView(io.RawIOBase):
    """A chunk's ``torch.save`` archive as a read-only file, for ``zipfile``: its first and
    last few KiB, read beforehand, are all that reading its layout takes (anything else is
    read when asked for)."""

    def __init__(self, storage: Storage, chunk: Chunk, head: bytes, tail: bytes) -> None:
        self._storage = storage
        self._chunk = chunk
        self._pos = 0
        self._head, self._tail = head, tail
        self._tail_start = chunk.length - len(tail)
        if (len(head), len(tail)) != _end_sizes(chunk.length):
            raise EOFError("the shard file ends inside the chunk's archive")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._chunk.length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = max(0, min(len(buffer), self._chunk.length - self._pos))
        end = self._pos + n
        if end <= len(self._head):
            data = self._head[self._pos : end]
        elif self._pos >= self._tail_start:
            data = self._tail[self._pos - self._tail_start : end - self._tail_start]
        else:
            data = self._storage.read(self._chunk.file, self._chunk.offset + self._pos, n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)
