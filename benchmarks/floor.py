"""The I/O floor of a conversion: plain file reads and writes, no torch, no parsing.

    python benchmarks/floor.py PLAN.json OUT [--fsync] [--write-mib N] [--drop-behind]

``PLAN.json`` holds ``{"reads": [[path, offset, length], ...], "out_bytes": N}``: the byte
ranges of the shard files that hold the tensors the converter's output needs, and that
output's size. Reads every range into one reused buffer and, as it goes, writes the same
proportion of ``out_bytes`` into ``OUT`` from it, streaming as the converter does; with
``--fsync`` then syncs ``OUT``, as the converter syncs its output before publishing it.

Each write call copies at most ``--write-mib`` MiB (1, as the converter's calls do): the page
cache sizes its folios by the write, and on some machines fresh large folios cost far more to
fill (converter/filler.py). The benchmark also times 8 MiB calls, this script's size before,
which shows the difference on the machine at hand.

With ``--drop-behind``, every ``DROP_EVERY`` bytes written are read back into the buffer, the
file is synced, and the pages of what was read back are dropped from the page cache: the
converter's I/O since its read-back follows its writes (converter/filler.py), on one thread.
"""

from __future__ import annotations

import argparse
import json
import os

BLOCK = 16 << 20
DROP_EVERY = 128 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan")
    parser.add_argument("out")
    parser.add_argument("--fsync", action="store_true")
    parser.add_argument("--write-mib", type=int, default=1, help="the most one write copies")
    parser.add_argument("--drop-behind", action="store_true", help="read back, sync, drop")
    args = parser.parse_args()
    if args.write_mib < 1:
        parser.error("--write-mib must be at least 1")
    with open(args.plan) as f:
        plan = json.load(f)
    reads, out_bytes = plan["reads"], plan["out_bytes"]
    in_bytes = sum(length for _, _, length in reads)
    buffer = memoryview(bytearray(BLOCK))
    done_in = done_out = 0
    fds: dict[str, int] = {}
    out = os.open(args.out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    dropped = 0  # the bytes read back, synced and dropped
    try:
        for path, offset, length in reads:
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY)
            end = offset + length
            while offset < end:
                got = os.preadv(fds[path], [buffer[: min(BLOCK, end - offset)]], offset)
                if not got:
                    raise EOFError(f"{path} ends at byte {offset}")
                offset, done_in = offset + got, done_in + got
                # Write out_bytes in proportion to what has been read so far.
                _write_all(out, buffer, out_bytes * done_in // in_bytes - done_out, args.write_mib)
                done_out = out_bytes * done_in // in_bytes
                if args.drop_behind and done_out - dropped >= DROP_EVERY:
                    _read_back(out, buffer, dropped, done_out)
                    os.fdatasync(out)
                    os.posix_fadvise(out, dropped, done_out - dropped, os.POSIX_FADV_DONTNEED)
                    dropped = done_out
        if args.drop_behind:
            _read_back(out, buffer, dropped, done_out)
        if args.fsync:
            os.fsync(out)
    finally:
        os.close(out)
        for fd in fds.values():
            os.close(fd)


def _write_all(fd: int, buffer: memoryview, n: int, write_mib: int) -> None:
    """Writes ``n`` bytes from ``buffer``, at most ``write_mib`` MiB per call, each call from
    the next bytes of the buffer (as the converter's calls come from the next bytes of a
    window), wrapping around at its end."""
    pos = 0
    while n:
        written = os.write(fd, buffer[pos : pos + min(n, write_mib << 20)])
        n, pos = n - written, (pos + written) % len(buffer)


def _read_back(fd: int, buffer: memoryview, start: int, end: int) -> None:
    """Reads bytes ``start`` to ``end`` of ``fd`` into ``buffer``, a block at a time."""
    while start < end:
        got = os.preadv(fd, [buffer[: min(BLOCK, end - start)]], start)
        if not got:
            raise EOFError(f"the output ends at byte {start}")
        start += got


if __name__ == "__main__":
    main()
