"""The digests the manifest records: XXH3-128 of every file (what ``xxh128sum`` prints), and
sha256 when asked for. Files are read through mappings of one window at a time: no copy of
the bytes, and no more of a file resident than a window."""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import xxhash

_WINDOW = 16 << 20
# What a pass that hashes the same bytes twice (the file's digest and a written range's) takes
# at a time: small enough to stay in the CPU's caches for the second, so that memory is read
# once.
_PIECE = 1 << 20
ALGORITHMS = ("xxh3_128", "sha256")


def windows(path: Path) -> Iterator[tuple[int, memoryview]]:
    """The file in order: ``(offset, bytes)`` a window at a time, each populated at once."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for pos in range(0, size, _WINDOW):
            length = min(_WINDOW, size - pos)
            flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
            with (
                mmap.mmap(f.fileno(), length, flags, mmap.PROT_READ, offset=pos) as window,
                memoryview(window) as view,
            ):
                yield pos, view


def pieces(path: Path) -> Iterator[tuple[int, memoryview]]:
    """The file in order: ``(offset, bytes)`` of at most ``_PIECE`` bytes each."""
    for pos, view in windows(path):
        for at in range(0, len(view), _PIECE):
            with view[at : at + _PIECE] as piece:
                yield pos + at, piece


def _hasher(algorithm: str) -> xxhash.xxh3_128 | hashlib._Hash:
    return xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.new(algorithm)


def file_digest(path: Path, algorithm: str = "xxh3_128") -> str:
    digest = _hasher(algorithm)
    for _, view in windows(path):
        digest.update(view)
    return digest.hexdigest()


def content_digests(content: bytes, sha256: bool) -> dict[str, str | int]:
    """Size and digests of a small file's bytes, as the manifest records a file."""
    found: dict[str, str | int] = {"bytes": len(content)}
    for algorithm in ALGORITHMS[: 2 if sha256 else 1]:
        digest = _hasher(algorithm)
        digest.update(content)
        found[algorithm] = digest.hexdigest()
    return found
