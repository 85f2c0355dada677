"""The disk's own write speed: a file of the output's size written from memory, then synced.

    python benchmarks/direct_write.py OUT BYTES [--read-back]

Writes with ``O_DIRECT`` (no copy into the page cache, no write-back to wait for), 16 MiB per
call from one aligned buffer, then fsyncs; with ``--read-back``, then reads the file back from
the device, ``O_DIRECT`` too, as a check of every byte written must when the page cache holds
none of them. Imports nothing but the standard library, so that its wall time is the disk's.
``bound.py`` times it.
"""

from __future__ import annotations

import argparse
import mmap
import os

BLOCK = 16 << 20
# O_DIRECT writes whole blocks of the device from aligned memory (an anonymous mapping is
# page-aligned): the size is rounded up to whole blocks.
ALIGN = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("bytes", type=int)
    parser.add_argument("--read-back", action="store_true")
    args = parser.parse_args()
    buffer = memoryview(mmap.mmap(-1, BLOCK))
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    try:
        left = -(-args.bytes // ALIGN) * ALIGN
        while left:
            left -= os.write(fd, buffer[: min(left, BLOCK)])
        os.fsync(fd)
    finally:
        os.close(fd)
    if args.read_back:
        fd = os.open(args.out, os.O_RDONLY | os.O_DIRECT)
        try:
            while os.readv(fd, [buffer]):
                pass
        finally:
            os.close(fd)


if __name__ == "__main__":
    main()
