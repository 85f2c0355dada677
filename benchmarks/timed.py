"""Run a command; print its wall and CPU seconds, peak RSS and exit code as one JSON line.

    python benchmarks/timed.py --log LOG [--cgroup DIR] -- CMD ...

The benchmark (``measure.py``) starts every command it measures through this launcher, which
imports nothing but the standard library: Linux carries a process's RSS high-water mark across
``exec``, so a child forked straight from the benchmark (which holds torch, ~300 MB) would
report at least that much. From here the baseline is this interpreter's ~10 MB. With
``--cgroup``, the child joins that cgroup v1 memory cgroup before it ``exec``s, so everything it
maps is charged there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True, help="the command's stdout+stderr")
    parser.add_argument("--cgroup", type=Path, help="a cgroup v1 memory cgroup to run it in")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd

    def enter_cgroup() -> None:
        (args.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    with open(args.log, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=enter_cgroup if args.cgroup else None,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    cpu, rss_mb = usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 1e6  # KiB -> MB
    print(json.dumps({"wall": wall, "cpu": cpu, "rss_mb": rss_mb, "code": code}))


if __name__ == "__main__":
    main()
