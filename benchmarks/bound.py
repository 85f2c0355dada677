"""What bounds a conversion's wall time from below, against the I/O floor: a table.

    python benchmarks/bound.py --work WORK [--input weights_2300M] [--repeats 5]

Run after ``run.py`` has built the input in ``WORK``; like ``run.py`` it first converts the
input once, untimed, for the floor's plan and the digests the defaults' output must have.
A conversion checks every byte it writes by reading it back. Its writes can go through the
page cache, read back from there: as the floor (``floor.py --fsync``: reads what the output
needs, writes its size through the page cache, fsyncs), or, as the converter does, read back
right behind the writes, synced and dropped from the page cache (``floor.py --fsync
--drop-behind``), which spares later writes memory never used before. Or they go past the page
cache (``O_DIRECT``), and the bytes must be read back from the device: ``direct_write.py
--read-back`` times that for the output's size, with nothing else running. Whichever way, a
conversion first imports torch, which a stdlib script such as the floor does not (``python -c
"import torch"``; ``convert.py --help`` adds Hydra's config and converts nothing). Each bound
is the sum of two medians: not strict, as a conversion could overlap some I/O with its
imports, but the cast and the DCP metadata both need torch. Each repeat times
the yardsticks and the converter's defaults in turn, as ``run.py`` times a method
(``measure.measure``): input read once, disk synced, output removed after, untimed.
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
from measure import (
    DEFAULTS,
    FLOOR,
    FLOOR_DROP,
    HERE,
    Case,
    measure,
    prepare,
    run_child,
    warm,
)

TORCH = 'importing torch: python -c "import torch"'
STARTUP = "start-up: convert.py --help (imports, Hydra's config; converts nothing)"
DISK = "the output's bytes written with O_DIRECT, then fsync (the disk alone)"
READ_BACK = "the same, then read back with O_DIRECT (the disk alone, checked)"


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
    case = Case(by_name(False, args.input), work, (FLOOR, FLOOR_DROP, DEFAULTS))
    if not case.step_dir.is_dir():
        sys.exit(f"{case.step_dir} is missing: build it with benchmarks/run.py --work {work}.")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # The reference conversion: the floor's plan, and the bytes the defaults' output must hold.
    prepare(case, logs)
    out_bytes = case.reference["meta"]["out_bytes"]
    direct_out = case.out_dir / f"{case.inp.name}-direct.bin"
    direct = [sys.executable, str(HERE / "direct_write.py"), str(direct_out), str(out_bytes)]
    yardsticks = {
        TORCH: ([sys.executable, "-c", "import torch"], None),
        STARTUP: ([sys.executable, str(REPO / "convert.py"), "--help"], None),
        DISK: (direct, direct_out),
        READ_BACK: ([*direct, "--read-back"], direct_out),
    }
    labels = (*yardsticks, *(m.label for m in case.methods))
    walls: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(args.repeats):
        for label, (argv, out) in yardsticks.items():
            walls[label].append(yardstick(argv, out, case, logs))
        for method in case.methods:
            record = measure(method, case, logs)
            if record["code"]:
                sys.exit(f"{method.label} failed (exit {record['code']}): see {record['log']}")
            walls[method.label].append(record["wall"])
    median = {label: statistics.median(w) for label, w in walls.items()}
    floor = median[FLOOR.label]
    bounds = {
        "through the page cache: importing torch + the floor": median[TORCH] + floor,
        "read back and dropped behind: importing torch + that floor": median[TORCH]
        + median[FLOOR_DROP.label],
        "past it: importing torch + the disk alone, checked": median[TORCH] + median[READ_BACK],
    }
    print(f"{case.inp.name}: {out_bytes / 1e6:.0f} MB written, {args.repeats} repeats\n")
    print("| what | wall s median (min-max) | / floor (fsync) |\n| --- | ---: | ---: |")
    for label, w in walls.items():
        print(f"| {label} | {median[label]:.2f} ({min(w):.2f}-{max(w):.2f}) | "
              f"{median[label] / floor:.2f} |")  # fmt: skip
    for label, bound in bounds.items():
        print(f"| the bound {label} | {bound:.2f} | {bound / floor:.2f} |")


if __name__ == "__main__":
    main()
