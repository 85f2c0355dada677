"""What bounds a conversion's wall time from below, against the I/O floor: a table.

    python benchmarks/bound.py --work WORK [--input weights_2300M] [--repeats 5]

Run after ``run.py`` has built the input in ``WORK`` (its step folder and the floor's plan).
A conversion run as a user runs it takes the interpreter's start-up (importing torch and Hydra,
composing the config: ``convert.py --help`` does all of it and converts nothing) and the time
the disk takes to write the output's bytes, timed here by ``direct_write.py``: the output's size
written with ``O_DIRECT`` from memory, then an fsync; no reads, no copy into the page cache, no
write-back to wait for. Their sum over the floor (``floor.py --fsync``: reads what the output
needs, writes its size through the page cache) is about the least ratio a conversion can reach
on the machine; not a strict bound, as one stream of direct writes may keep fewer of them in
flight than the kernel's write-back does. Each repeat times the three and the converter's
defaults in turn, after the input is read once; outputs are removed and the disk synced
between runs, untimed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

# As in run.py: the checkout's own packages come before an installed titan2tune's.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from inputs import REPO, by_name
from measure import (
    DEFAULTS,
    FLOOR,
    HERE,
    Case,
    command,
    output_path,
    remove_outputs,
    run_child,
    warm,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="run.py's --work")
    parser.add_argument("--input", default="weights_2300M")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = args.work.resolve()
    case = Case(by_name(False, args.input), work, (DEFAULTS, FLOOR))
    if not case.floor_plan.exists():
        sys.exit(f"{case.floor_plan} is missing: run benchmarks/run.py --work {work} first.")
    out_bytes = int(json.loads(case.floor_plan.read_text())["out_bytes"])
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    direct_out = case.out_dir / f"{case.inp.name}-direct.bin"
    rows = {
        "start-up: convert.py --help (imports, Hydra's config; converts nothing)": (
            [sys.executable, str(REPO / "convert.py"), "--help"],
            None,
        ),
        "the output's bytes written with O_DIRECT, then fsync (the disk alone)": (
            [
                sys.executable,
                str(HERE / "direct_write.py"),
                str(direct_out),
                str(out_bytes),
            ],
            direct_out,
        ),
        FLOOR.label: (command(FLOOR, case, output_path(case, FLOOR)), output_path(case, FLOOR)),
        DEFAULTS.label: (
            command(DEFAULTS, case, output_path(case, DEFAULTS)),
            output_path(case, DEFAULTS),
        ),
    }
    case.out_dir.mkdir(parents=True, exist_ok=True)
    walls: dict[str, list[float]] = {label: [] for label in rows}
    for _ in range(args.repeats):
        warm(case.step_dir)
        for label, (argv, out) in rows.items():
            if out is not None:
                remove_outputs(out)
            os.sync()
            done = run_child(argv, logs / "bound.log")
            if done["code"]:
                sys.exit(f"{label} failed (exit {done['code']}): see {logs / 'bound.log'}")
            walls[label].append(done["wall"])
            if out is not None:
                remove_outputs(out)
    median = {label: statistics.median(w) for label, w in walls.items()}
    startup, disk, floor, _ = median.values()
    print(f"{case.inp.name}: {out_bytes / 1e6:.0f} MB written, {args.repeats} repeats\n")
    print("| what | wall s median (min-max) | / floor (fsync) |\n| --- | ---: | ---: |")
    for label, w in walls.items():
        print(f"| {label} | {median[label]:.2f} ({min(w):.2f}-{max(w):.2f}) | "
              f"{median[label] / floor:.2f} |")  # fmt: skip
    print(f"| the bound: start-up + the disk alone | {startup + disk:.2f} | "
          f"{(startup + disk) / floor:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
