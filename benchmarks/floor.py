"""The I/O floor of a conversion: plain file reads and writes, no torch, no parsing.

    python benchmarks/floor.py PLAN.json OUT [--fsync]

``PLAN.json`` holds ``{"reads": [[path, offset, length], ...], "out_bytes": N}``: the byte
ranges of the shard files that hold the tensors the converter's output needs, and that
output's size. Reads every range into one reused buffer and, as it goes, writes the same
proportion of ``out_bytes`` into ``OUT`` from it, streaming as the converter does; with
``--fsync`` then syncs ``OUT``, as the converter syncs its output before publishing it.
"""

from __future__ import annotations

import argparse
import json
import os

BLOCK = 16 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan")
    parser.add_argument("out")
    parser.add_argument("--fsync", action="store_true")
    args = parser.parse_args()
    with open(args.plan) as f:
        plan = json.load(f)
    reads, out_bytes = plan["reads"], plan["out_bytes"]
    in_bytes = sum(length for _, _, length in reads)
    buffer = memoryview(bytearray(BLOCK))
    done_in = done_out = 0
    fds: dict[str, int] = {}
    out = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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
                _write_all(out, buffer, out_bytes * done_in // in_bytes - done_out)
                done_out = out_bytes * done_in // in_bytes
        if args.fsync:
            os.fsync(out)
    finally:
        os.close(out)
        for fd in fds.values():
            os.close(fd)


def _write_all(fd: int, buffer: memoryview, n: int) -> None:
    """Writes ``n`` bytes from ``buffer``, repeating it if ``n`` exceeds its size."""
    while n:
        n -= os.write(fd, buffer[: min(n, len(buffer))])


if __name__ == "__main__":
    main()
