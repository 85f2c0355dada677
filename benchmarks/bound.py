"""What bounds a conversion's wall time from below, against the I/O floor: a table.

    python benchmarks/bound.py --work WORK [--input weights_2300M] [--repeats 5]

Run after ``run.py`` has built the input in ``WORK``; like ``run.py`` it first converts the
input once, untimed, for the floor's plan and the digests the defaults' output must have.
A conversion run as a user runs it takes the interpreter's start-up (importing torch and Hydra,
composing the config: ``convert.py --help`` does all of it and converts nothing) and the time
the disk takes to write the output's bytes, timed here by ``direct_write.py``: the output's size
written with ``O_DIRECT`` from memory, then an fsync; no reads, no copy into the page cache, no
write-back to wait for. Their sum over the floor (``floor.py --fsync``: reads what the output
needs, writes its size through the page cache) is about the least ratio a conversion can reach
on the machine; not a strict bound, as one stream of direct writes may keep fewer of them in
flight than the kernel's write-back does. Each repeat times the three and the converter's
defaults in turn, as ``run.py`` times a method (``measure.measure``): input read once, disk
synced, output removed after, untimed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

# As in run.py: the checkout's own packages come before an installed titan2tune's.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from inputs import REPO, by_name
from measure import DEFAULTS, FLOOR, HERE, Case, measure, prepare, run_child, warm

STARTUP = "start-up: convert.py --help (imports, Hydra's config; converts nothing)"
DISK = "the output's bytes written with O_DIRECT, then fsync (the disk alone)"


def yardstick(argv: list[str], out: Path | None, case: Case, logs: Path) -> float:
    """The wall time of a command that converts nothing, run as ``measure`` runs a method:
    input warm, disk settled, its output (if any) removed after."""
    warm(case.step_dir)
    os.sync()
    done = run_child(argv, logs / "bound.log")
    if out is not None:
        out.unlink(missing_ok=True)
    if done["code"]:
        sys.exit(f"{argv} failed (exit {done['code']}): see {logs / 'bound.log'}")
    return done["wall"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="run.py's --work")
    parser.add_argument("--input", default="weights_2300M")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = args.work.resolve()
    case = Case(by_name(False, args.input), work, (FLOOR, DEFAULTS))
    if not case.step_dir.is_dir():
        sys.exit(f"{case.step_dir} is missing: build it with benchmarks/run.py --work {work}.")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # The reference conversion: the floor's plan, and the bytes the defaults' output must hold.
    prepare(case, logs)
    out_bytes = case.reference["meta"]["out_bytes"]
    direct_out = case.out_dir / f"{case.inp.name}-direct.bin"
    startup = [sys.executable, str(REPO / "convert.py"), "--help"]
    direct = [sys.executable, str(HERE / "direct_write.py"), str(direct_out), str(out_bytes)]
    labels = (STARTUP, DISK, *(m.label for m in case.methods))
    walls: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(args.repeats):
        walls[STARTUP].append(yardstick(startup, None, case, logs))
        walls[DISK].append(yardstick(direct, direct_out, case, logs))
        for method in case.methods:
            record = measure(method, case, logs)
            if record["code"]:
                sys.exit(f"{method.label} failed (exit {record['code']}): see {record['log']}")
            walls[method.label].append(record["wall"])
    median = {label: statistics.median(w) for label, w in walls.items()}
    bound, floor = median[STARTUP] + median[DISK], median[FLOOR.label]
    print(f"{case.inp.name}: {out_bytes / 1e6:.0f} MB written, {args.repeats} repeats\n")
    print("| what | wall s median (min-max) | / floor (fsync) |\n| --- | ---: | ---: |")
    for label, w in walls.items():
        print(f"| {label} | {median[label]:.2f} ({min(w):.2f}-{max(w):.2f}) | "
              f"{median[label] / floor:.2f} |")  # fmt: skip
    print(f"| the bound: start-up + the disk alone | {bound:.2f} | {bound / floor:.2f} |")


if __name__ == "__main__":
    main()
