"""Where tensor bytes lie inside a ``torch.save`` archive: shared by the reader, which reads a
chunk's storage straight from a DCP blob, and by the sink, which fills its output in place."""

from __future__ import annotations

import zipfile
from typing import BinaryIO

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
