"""Reading a torchtitan DCP step folder: finding it, validating it, and streaming its chunks.

DCP stores each saved chunk (an FSDP2/TP shard of a tensor) as a small ``torch.save`` blob at
an offset inside a ``__<rank>_<i>.distcp`` file, and indexes them in the pickled ``.metadata``.
We read that index ourselves rather than calling ``dcp.load`` so that a conversion can pull one
chunk at a time, in any order, from several threads, and skip the optimizer state unread: peak
memory is then one chunk per worker, whatever the checkpoint's size.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import torch

from converter.archive import storage_records
from converter.errors import ConversionError, environment_error
from converter.steps import METADATA_FILE


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


class _Record:
    """An object of one of DCP's index classes (``kind``), read back as plain fields."""

    kind = ""

    def __setstate__(self, state: object) -> None:
        if self.kind == "TensorProperties" and isinstance(state, tuple):
            state = {"dtype": state[0]}  # its own __getstate__: (dtype, layout, ...)
        elif isinstance(state, tuple):  # a class with __slots__: (__dict__, slot values)
            state = {**(state[0] or {}), **state[1]}
        if not isinstance(state, dict):
            raise _NotAnIndex(f"a {self.kind} holds {type(state).__name__} state")
        self.__dict__.update(state)


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_RECORDS = {
    name: type(name, (_Record,), {"kind": name})
    for name in (
        "Metadata",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "_StorageInfo",
    )
}
# What else an index names, and what stands for it: torch.Size(...) -> a tuple,
# _MEM_FORMAT_ENCODING(0) -> 0, _get_layout("torch.strided") -> the layout's name.
_PLAIN = {
    ("torch", "Size"): tuple,
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): int,
    ("torch.serialization", "_get_layout"): str,
    ("collections", "OrderedDict"): dict,
    ("pathlib", "PosixPath"): PurePosixPath,
    ("pathlib", "PurePosixPath"): PurePosixPath,
}


class _NotAnIndex(Exception):
    """The pickle names something that a DCP index does not hold."""


class _IndexUnpickler(pickle.Unpickler):
    """Reads a DCP ``.metadata`` pickle as data, with an allowlist of the classes it may name.

    ``pickle.load`` would run whatever code the file names, and needs DCP imported for its
    classes: that import pulls in DTensor and costs ~1.5 s of every run's start-up. The index
    is plain data (names, shapes, dtypes, file offsets), so stand-ins carry it as well.
    """

    def find_class(self, module: str, name: str) -> object:
        if module in _DCP_MODULES and name in _RECORDS:
            return _RECORDS[name]
        if (module, name) in _PLAIN:
            return _PLAIN[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _NotAnIndex(f"it names {module}.{name}, which a DCP index does not hold")


class DcpCheckpoint:
    """A validated DCP step folder: its index and the means to read any chunk of it."""

    def __init__(self, step_dir: Path) -> None:
        self.step_dir = step_dir
        self.metadata_path = step_dir / METADATA_FILE
        metadata = self._read_metadata()
        # MetadataIndex(fqn, offset) -> where the chunk lies; bytes entries have no offset.
        storage = {
            (i.fqn, tuple(getattr(i, "offset", None) or ())): info
            for i, info in metadata.storage_data.items()
        }
        self.tensors: dict[str, TensorEntry] = {}
        self.byte_entries: list[str] = []
        shard_extent: dict[Path, int] = {}
        for key, md in metadata.state_dict_metadata.items():
            if md.kind == "BytesStorageMetadata":
                self.byte_entries.append(key)
                continue
            if md.kind != "TensorStorageMetadata":
                raise self._unknown_format(f"entry {key!r} is a {md.kind}")
            chunks = []
            for c in md.chunks:
                info = storage.get((key, tuple(c.offsets)))
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

    def _read_metadata(self) -> _Record:
        try:
            with open(self.metadata_path, "rb") as f:
                metadata = _IndexUnpickler(f).load()
        except _NotAnIndex as e:
            raise self._unknown_format(str(e)) from e
        except Exception as e:  # pickle raises a zoo of types on damaged input
            raise ConversionError(
                f"Cannot read {self.metadata_path} ({type(e).__name__}: {e}). The file is "
                "truncated or damaged, so the save did not finish cleanly; convert another "
                "step (experiment.step) or re-save this one."
            ) from e
        if (
            getattr(metadata, "kind", None) != "Metadata"
            or not isinstance(getattr(metadata, "state_dict_metadata", None), dict)
            or not isinstance(getattr(metadata, "storage_data", None), dict)
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
        self,
        entry: TensorEntry,
        chunk: Chunk,
        buffer: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Loads one chunk, or its rows ``[start, stop)``, checked against the index, in its
        stored dtype.

        The blob is read in two steps so that its bytes are copied once, from the file straight
        into ``buffer`` (a uint8 tensor large enough, reused by the caller; a fresh one if
        None): ``torch.load`` under ``skip_data`` builds the tensor's metadata (dtype, shape,
        strides) from the blob's pickle without its bytes, then the bytes of the blob's one
        storage record (of the rows asked for) are read into the buffer and the tensor is laid
        over them.
        """
        # Two phases, so that an error blames what is at fault: parsing the blob (its pickle and
        # zip records) fails only on bad bytes; copying them into the buffer fails on I/O, a short
        # file, or the environment (torch without numpy raises RuntimeError there).
        try:
            with open(chunk.path, "rb", buffering=0) as f:
                window = _FileWindow(f, chunk.offset, chunk.length)
                try:
                    with torch.serialization.skip_data():
                        meta = torch.load(window, map_location="cpu", weights_only=True)
                    records = storage_records(window)
                    if len(records) != 1:
                        raise ValueError(f"{len(records)} storage records in a one-tensor blob")
                    [(start, length)] = records
                    if length != meta.untyped_storage().nbytes():
                        raise ValueError(f"a storage record of {length} bytes for its tensor")
                except OSError:
                    raise
                except (ImportError, MemoryError) as e:
                    raise environment_error(f"Reading {entry.key!r} from {chunk.path}", e) from e
                except Exception as e:
                    raise self._damaged(entry, chunk, e) from e
                if tuple(meta.shape) != chunk.sizes or meta.dtype != entry.dtype:
                    raise ConversionError(
                        f"Chunk {chunk.offsets} of {entry.key!r} in {chunk.path} does not match "
                        f"{self.metadata_path} (expected {entry.dtype} of shape {chunk.sizes}). "
                        "The shard file and the index come from different saves; copy the step "
                        "folder again."
                    )
                offset = meta.storage_offset()
                if rows is not None and meta.is_contiguous() and not offset:
                    row_bytes = length // max(chunk.sizes[0], 1)
                    start, length = start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
                    meta, rows = meta[rows[0] : rows[1]], None  # the bytes read are the rows
                if buffer is None or rows is not None:
                    # Rows of a chunk stored as a view (strided, or at an offset in a larger
                    # storage: rare) come from the whole storage, read into a buffer of its own.
                    buffer = torch.empty(length, dtype=torch.uint8)
                if length > buffer.numel():
                    raise ValueError(f"bug: {length} bytes do not fit the buffer")
                window.seek(start)
                try:
                    got = window.readinto(buffer[:length].numpy())
                except OSError:
                    raise
                except Exception as e:
                    raise environment_error(f"Reading {entry.key!r} from {chunk.path}", e) from e
                if got != length:
                    raise self._damaged(entry, chunk, EOFError("the storage record ends early"))
        except OSError as e:
            raise _io_error(chunk.path, e) from e
        assert buffer.storage_offset() == 0
        tensor = buffer[:length].view(meta.dtype).as_strided(meta.shape, meta.stride(), offset)
        return tensor if rows is None else tensor[rows[0] : rows[1]]

    def _damaged(self, entry: TensorEntry, chunk: Chunk, e: Exception) -> ConversionError:
        return ConversionError(
            f"Cannot read chunk {chunk.offsets} of {entry.key!r} from {chunk.path} at byte "
            f"{chunk.offset} ({type(e).__name__}: {e}). The shard file is damaged; copy "
            "the step folder again or convert another step."
        )

    def parts(self, entry: TensorEntry, max_bytes: int = 32 << 20) -> list[RowPart]:
        """The tensor as runs of whole rows in order, each loadable on its own and, but for
        single rows larger than that, of at most ``max_bytes``: so that one 128k-vocabulary
        embedding shard does not need its 1 GB in memory at once."""
        if not entry.row_chunked:
            return [RowPart(0, entry.shape[0], entry.nbytes, partial(self.read_tensor, entry))]
        row_bytes = math.prod(entry.shape[1:]) * entry.dtype.itemsize
        step = max(1, max_bytes // max(row_bytes, 1))
        parts = []
        for c in sorted(entry.chunks, key=lambda c: c.offsets):
            for lo in range(0, c.sizes[0], step):
                hi = min(lo + step, c.sizes[0])
                load = partial(self.read_chunk, entry, c, rows=(lo, hi))
                start = c.offsets[0]
                parts.append(RowPart(start + lo, start + hi, (hi - lo) * row_bytes, load))
        return parts

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


def _io_error(path: Path, e: OSError) -> ConversionError:
    return ConversionError(
        f"Cannot read {path}: {e.strerror or e} (errno {e.errno}). The storage failed while "
        "reading, which says nothing of the data: check the file system, then run again."
    )


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
