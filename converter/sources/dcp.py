"""A torchtitan DCP step folder: its index, checked against the shard files it names.

DCP stores each saved chunk (an FSDP2/TP/EP shard of a tensor) as a small ``torch.save``
archive at an offset inside a ``__<rank>_<i>.distcp`` file, and indexes them in the pickled
``.metadata``. We read that index ourselves rather than calling ``dcp.load`` so that a
conversion can pull any rows of any tensor, in any order, from several threads, and leave the
optimizer state unread: memory is then bounded by what the engine asks for, whatever the
checkpoint's size, and a remote store serves only the byte ranges the output needs.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import PurePosixPath

import torch

from converter.errors import ConversionError
from converter.plan import row_shape
from converter.sources.steps import METADATA_FILE
from converter.sources.storage import FileInfo, Storage


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor, and where its ``torch.save`` archive lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # the shard file's path in the storage
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
    def rows(self) -> tuple[int, int]:
        """``(rows, values per row)``: see ``converter.plan.row_shape``."""
        return row_shape(self.shape)

    @property
    def row_bytes(self) -> int:
        return self.rows[1] * self.dtype.itemsize


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


def _tiling_fault(entry: TensorEntry) -> str | None:
    """What keeps ``entry``'s chunks from covering its shape exactly once, or None.

    The reader places each chunk's rows where the index says and reads nothing else, so a
    chunk missing from a damaged index would leave rows of whatever its buffer held. Checked
    on the grid the chunks' own boundaries make, one counter per cell (a few cells per shard
    dimension for the FSDP/TP/EP shardings torchtitan saves), or, where the chunks split one
    dimension only, as ranges of it."""
    shape, chunks = entry.shape, entry.chunks
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            return f"include one of {len(c.offsets)} dimensions at {list(c.offsets)}"
        if any(
            o < 0 or s < 0 or o + s > n for o, s, n in zip(c.offsets, c.sizes, shape, strict=True)
        ):
            return f"include one at {list(c.offsets)} of sizes {list(c.sizes)}, beyond the shape"
    split = [d for d, n in enumerate(shape) if any(c.sizes[d] != n for c in chunks)]
    if len(split) == 1:  # the usual FSDP/EP save: ranges of one dimension, in order
        d = split[0]
        end = 0
        for c in sorted((c for c in chunks if c.sizes[d]), key=lambda c: c.offsets[d]):
            if c.offsets[d] != end:
                return "leave part of it uncovered" if c.offsets[d] > end else "overlap"
            end += c.sizes[d]
        return None if end == shape[d] else "leave part of it uncovered"
    # Per dimension, the cuts that the chunks' starts and ends make there.
    cuts = [
        sorted(
            {0, n, *(c.offsets[d] for c in chunks), *(c.offsets[d] + c.sizes[d] for c in chunks)}
        )
        for d, n in enumerate(shape)
    ]
    at = [{cut: i for i, cut in enumerate(x)} for x in cuts]
    cells = torch.zeros([len(x) - 1 for x in cuts], dtype=torch.int32)
    for c in chunks:
        cells[
            tuple(slice(i[o], i[o + s]) for i, o, s in zip(at, c.offsets, c.sizes, strict=True))
        ] += 1
    if cells.numel() and int(cells.min()) == 0:
        return "leave part of it uncovered"
    if cells.numel() and int(cells.max()) > 1:
        return "overlap"
    return None


class DcpIndex:
    """The index of a DCP step folder, validated: every tensor's chunks, every bytes entry,
    and the shard files, each present and long enough for the chunks it holds."""

    def __init__(self, storage: Storage, step_dir: str) -> None:
        self.storage = storage
        self.step_dir = step_dir
        self.metadata_path = storage.join(step_dir, METADATA_FILE)
        metadata = self._read_metadata()
        # MetadataIndex(fqn, offset) -> where the chunk lies; bytes entries have no offset.
        storage_data = {
            (i.fqn, tuple(getattr(i, "offset", None) or ())): info
            for i, info in metadata.storage_data.items()
        }
        self.tensors: dict[str, TensorEntry] = {}
        self.byte_entries: list[str] = []
        extent: dict[str, int] = {}
        for key, md in metadata.state_dict_metadata.items():
            if md.kind == "BytesStorageMetadata":
                self.byte_entries.append(key)
                continue
            if md.kind != "TensorStorageMetadata":
                raise self._unknown_format(f"entry {key!r} is a {md.kind}")
            chunks = []
            for c in md.chunks:
                info = storage_data.get((key, tuple(c.offsets)))
                if info is None:
                    raise self._unknown_format(f"no storage record for a chunk of {key!r}")
                if getattr(info, "transform_descriptors", None):
                    raise ConversionError(
                        f"{self._shown(self.metadata_path)}: {key!r} was saved through DCP "
                        f"stream extensions {info.transform_descriptors} (e.g. compression), "
                        "which this converter does not read. Re-save without them."
                    )
                path = storage.join(step_dir, str(info.relative_path))
                extent[path] = max(extent.get(path, 0), info.offset + info.length)
                chunks.append(
                    Chunk(tuple(c.offsets), tuple(c.sizes), path, info.offset, info.length)
                )
            entry = TensorEntry(key, md.properties.dtype, tuple(md.size), tuple(chunks))
            if fault := _tiling_fault(entry):
                raise ConversionError(
                    f"{self._shown(self.metadata_path)} is inconsistent: the chunks it lists "
                    f"for {key!r} (shape {list(entry.shape)}) {fault}, where each value must be "
                    "stored exactly once. The index is damaged or was edited; "
                    "convert another step (experiment.step) or re-save this one."
                )
            self.tensors[key] = entry
        self.files: dict[str, FileInfo] = self._check_shards(extent)

    def _shown(self, path: str) -> str:
        return self.storage.display(path)

    def _read_metadata(self) -> _Record:
        shown = self._shown(self.metadata_path)
        data = self.metadata_bytes = self.storage.read(self.metadata_path)
        try:
            metadata = _IndexUnpickler(io.BytesIO(data)).load()
        except _NotAnIndex as e:
            raise self._unknown_format(str(e)) from e
        except Exception as e:  # pickle raises a zoo of types on damaged input
            raise ConversionError(
                f"Cannot read {shown} ({type(e).__name__}: {e}). The file is "
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
            f"{self._shown(self.metadata_path)} is not a torch.distributed.checkpoint index this "
            f"converter understands ({what}). Check that {self._shown(self.step_dir)} is a DCP "
            "save written by torchtitan with torch >= 2.4."
        )

    def _check_shards(self, extent: dict[str, int]) -> dict[str, FileInfo]:
        """The index and every shard file it names, as the storage lists them (one listing:
        a remote store answers it in one request)."""
        listed = {e.name: e for e in self.storage.listdir(self.step_dir) if not e.is_dir}
        files = {self.metadata_path: listed[METADATA_FILE]} if METADATA_FILE in listed else {}
        for path, needed in sorted(extent.items()):
            info = listed.get(self.storage.name(path))
            if info is None:
                raise ConversionError(
                    f"Shard file {self._shown(path)} named by {self._shown(self.metadata_path)} "
                    "is missing: the checkpoint is incomplete (a rank's files were not copied?). "
                    "Copy the whole step folder again or convert another step."
                )
            if info.size < needed:
                raise ConversionError(
                    f"Shard file {self._shown(path)} is truncated: {info.size} bytes, but "
                    f"{self._shown(self.metadata_path)} places data up to byte {needed}. Copy "
                    "the step folder again or convert another step."
                )
            files[path] = info
        return files
