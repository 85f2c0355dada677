"""Where tensor bytes lie inside a ``torch.save`` archive, read without ``torch.load``.

A DCP shard file holds one ``torch.save`` archive per stored chunk, and the ``.pt`` output is
one; both are zip files whose records are stored, not compressed, so a tensor's bytes can be
read, or written, in place. The reader (``converter.sources``) learns from a chunk's archive its
dtype, shape, strides and where its storage starts; the ``.pt`` format learns where to write.

``torch.load`` would do as well, at a cost per chunk (and it wants the whole archive at hand);
this module needs the archive's first and last few KiB only, which matters for a remote store.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import torch

_LOCAL_HEADER = 30  # fixed part of a zip local file header


def storage_records(archive: BinaryIO) -> list[tuple[int, int]]:
    """``(offset, length)`` of each storage record of the archive open in ``archive``, in file
    order. torch writes records stored (uncompressed), so these bytes are the tensor data."""
    with zipfile.ZipFile(archive) as zf:  # leaves ``archive`` open
        infos = [i for i in zf.infolist() if "/data/" in i.filename]
    return sorted((_data_start(archive, i), i.file_size) for i in infos)


def _data_start(f: BinaryIO, info: zipfile.ZipInfo) -> int:
    """A record's bytes begin after its local header, its name and its extra field (torch pads
    the extra field to align the data)."""
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER)
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + _LOCAL_HEADER + name_len + extra_len


@dataclass(frozen=True)
class StoredTensor:
    """One tensor saved alone with ``torch.save``: what it is and where its storage lies."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # in elements
    data_start: int  # byte offset of the storage within the archive
    data_length: int  # bytes of the storage

    @property
    def contiguous(self) -> bool:
        """Stored as a plain row-major array from the storage's first byte."""
        expected, step = [], 1
        for size in reversed(self.shape):
            expected.append(step)
            step *= size
        dims = [
            (s, e)
            for s, e, n in zip(self.stride, reversed(expected), self.shape, strict=True)
            if n > 1
        ]
        return self.storage_offset == 0 and all(s == e for s, e in dims)


class NotATensorArchive(Exception):
    """The archive is not ``torch.save`` of one tensor."""


def stored_tensor(archive: BinaryIO) -> StoredTensor:
    """Reads the layout of a ``torch.save`` archive of one tensor (``archive`` starts at the
    archive's first byte). Raises NotATensorArchive for anything else."""
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        pickles = [i for i in infos if i.filename.endswith("/data.pkl")]
        records = [i for i in infos if "/data/" in i.filename]
        if len(pickles) != 1 or len(records) != 1:
            raise NotATensorArchive(f"{len(records)} storage records, {len(pickles)} pickles")
        meta = _TensorPickle(io.BytesIO(zf.read(pickles[0]))).load()
    if not isinstance(meta, _Rebuilt):
        raise NotATensorArchive(f"it holds a {type(meta).__name__}, not a tensor")
    [record] = records
    if record.compress_type != zipfile.ZIP_STORED:
        raise NotATensorArchive("its storage record is compressed")
    if record.file_size != meta.numel * meta.dtype.itemsize:
        raise NotATensorArchive(f"a storage record of {record.file_size} bytes for its tensor")
    return StoredTensor(
        meta.dtype,
        meta.shape,
        meta.stride,
        meta.storage_offset,
        _data_start(archive, record),
        record.file_size,
    )


# "FloatStorage" -> torch.float32, as torch.save names a storage's dtype in the pickle.
_STORAGE_DTYPES = {
    name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()
}


@dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _Rebuilt:
    dtype: torch.dtype
    numel: int
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: _Storage, storage_offset: int, shape: tuple, stride: tuple, *_: object
) -> _Rebuilt:
    return _Rebuilt(storage.dtype, storage.numel, storage_offset, tuple(shape), tuple(stride))


def _rebuild_tensor_v3(
    storage: _Storage, storage_offset: int, shape: tuple, stride: tuple, _grad: bool,
    _hooks: object, dtype: torch.dtype, *_: object,
) -> _Rebuilt:  # fmt: skip
    """Tensors of dtypes without a typed storage class (float8): an untyped (byte) storage."""
    numel = storage.numel // dtype.itemsize
    return _Rebuilt(dtype, numel, storage_offset, tuple(shape), tuple(stride))


class _TensorPickle(pickle.Unpickler):
    """The ``data.pkl`` of a one-tensor archive, read as data: an allowlist of the callables it
    may name, none of which runs code of the file's choosing."""

    _GLOBALS: dict[tuple[str, str], Callable[..., object]] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("collections", "OrderedDict"): dict,
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[module, name]
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return torch.uint8  # sizes in bytes
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # dtypes newer than the typed storage classes
        raise NotATensorArchive(f"it names {module}.{name}")

    def persistent_load(self, pid: object) -> _Storage:
        # ('storage', <dtype>, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise NotATensorArchive(f"an unexpected persistent id {pid!r}")
        if not isinstance(pid[1], torch.dtype):
            raise NotATensorArchive(f"a storage of {pid[1]!r}")
        return _Storage(pid[1], int(pid[4]))
