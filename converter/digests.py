"""The digests the manifest records: XXH3-128 of every file (what ``xxh128sum`` prints), and
sha256 when asked for. Files are read a piece at a time into one buffer, which stays in the
CPU's caches while the piece is hashed: a copy, but cheaper than mapping the file, most of all
for an output written in many small tensors, whose pages the page cache holds one by one, each
to be mapped and unmapped."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import xxhash

# What a pass that hashes the same bytes twice (the file's digest and a written region's) takes
# at a time: small enough to stay in the CPU's caches for the second, so that memory is read
# once.
_PIECE = 1 << 20
ALGORITHMS = ("xxh3_128", "sha256")


def piece_buffer() -> bytearray:
    """A buffer for :func:`pieces`, to be reused: a fresh one costs a page fault per 4 KiB."""
    return bytearray(_PIECE)


def pieces(fd: int, start: int, end: int, buffer: bytearray) -> Iterator[memoryview]:
    """Bytes ``start`` to ``end`` of the open file ``fd`` in order (fewer if it ends before),
    in pieces of at most ``_PIECE`` bytes, each read into ``buffer`` (from
    :func:`piece_buffer`) over the one before: use it before asking for the next."""
    with memoryview(buffer) as whole:
        while start < end:
            n = os.preadv(fd, [whole[: min(_PIECE, end - start)]], start)
            if not n:
                return
            with whole[:n] as piece:
                yield piece
            start += n


def hasher(algorithm: str) -> xxhash.xxh3_128 | hashlib._Hash:
    return xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.new(algorithm)


def file_digest(path: Path, algorithm: str = "xxh3_128") -> str:
    digest = hasher(algorithm)
    fd = os.open(path, os.O_RDONLY)
    try:
        for piece in pieces(fd, 0, os.fstat(fd).st_size, piece_buffer()):
            digest.update(piece)
    finally:
        os.close(fd)
    return digest.hexdigest()


def content_digests(content: bytes, sha256: bool) -> dict[str, str | int]:
    """Size and digests of a small file's bytes, as the manifest records a file."""
    found: dict[str, str | int] = {"bytes": len(content)}
    for algorithm in ALGORITHMS[: 2 if sha256 else 1]:
        digest = hasher(algorithm)
        digest.update(content)
        found[algorithm] = digest.hexdigest()
    return found
