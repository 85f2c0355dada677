"""Benchmark titan2tune's conversions against ``dcp_to_torch``, the I/O floor and, for the
Hugging Face export, what a user does today (``hf_baseline.py``).

    python benchmarks/run.py --work benchmarks/work --repeats 5
    python benchmarks/run.py --work benchmarks/work --inputs weights_2300M moe_630M
    python benchmarks/run.py --work benchmarks/work --report-only
    python benchmarks/run.py --work /tmp/benchwork --repeats 1 --small     # a smoke run

Builds the inputs once into ``<work>/inputs`` (``inputs.py``), then for each: converts it once
untimed (the reference every timed output must match), times each of its methods
(``measure.py``) as a child of ``timed.py``, in another order every repeat; then runs some
conversions in a memory cgroup and records one with py-spy. Keeps everything in
``<work>/results.json``, merging a run of some ``--inputs`` with the earlier runs of the others,
and writes ``benchmarks/RESULTS.md``, ``results.png`` and ``PROFILE.md`` from it
(``report.py``). ``--small`` runs tiny stand-ins in ``<work>/small`` and writes its reports
there, never over the committed ones. Needs root for the memory cgroup and for py-spy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

# ``python benchmarks/run.py`` puts benchmarks/ first on sys.path; the checkout's own packages
# (converter, demo, tests) must come before an installed titan2tune's.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch
from inputs import DENSE, LARGE, NAMES, REPO, Input, by_name, select
from measure import (
    CGROUP_RUNS,
    Case,
    benchmark,
    evict,
    in_cgroup,
    methods_for,
    prepare,
    profile,
    run_child,
)
from report import write_reports

HERE = REPO / "benchmarks"


def build_inputs(selected: tuple[Input, ...], args: argparse.Namespace, work: Path) -> dict:
    """Writes each input's checkpoint unless it is already complete, each in a child process
    (``--build-input``) so that its time and peak RSS are its own; returns those."""
    stats = {}
    for inp in selected:
        if inp.built(work):
            continue
        print(f"building {inp.name} ({inp.kind}, {inp.note})", flush=True)
        log = work / "logs" / f"build-{inp.name}.log"
        argv = [sys.executable, str(HERE / "run.py"), "--work", str(args.work)]
        argv += [*(["--small"] if args.small else []), "--build-input", inp.name]
        run = run_child(argv, log)
        if run["code"]:
            raise RuntimeError(f"building {inp.name} exited {run['code']}; see {log}")
        stats[inp.name] = {"seconds": run["wall"], "peak_rss_mb": run["rss_mb"]}
        print(f"  done in {run['wall']:.0f} s, peak RSS {run['rss_mb']:.0f} MB", flush=True)
    return stats


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": str(os.cpu_count()),
        "RAM": f"{mem_kib / 2**20:.1f} GiB",
        "CPU": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def source_version() -> str:
    """The checkout's commit, and whether the converter's code differs from it."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "converter", "conf", "convert.py", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"commit {head}" + (" with uncommitted changes" if dirty else "")


def run_all(args: argparse.Namespace, work: Path, results: dict) -> None:
    """Builds the inputs, runs every measurement of the selected inputs into ``results`` under a
    new run id, saving them as each input is done."""
    logs = work / "logs"
    run_id = str(len(results["runs"]) + 1)
    results["runs"][run_id] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "version": source_version(),
        "machine": machine(),
        "repeats": args.repeats,
    }
    selected = select(args.small, args.inputs)
    results["build"].update(build_inputs(selected, args, work))
    save(results, work)
    cases = {}
    for inp in selected:
        case = cases[inp.name] = Case(inp, work, methods_for(inp))
        print(f"{inp.name}: reference conversion, then {args.repeats} repeats", flush=True)
        evict(*(i.step_dir(work) for i in selected))
        prepare(case, logs)
        benchmark(case, args.repeats, logs)
        results["cases"][inp.name] = case.record() | {"run": run_id}
        save(results, work)
    for name, methods in CGROUP_RUNS.items():
        for method in methods if name in cases else ():
            record = in_cgroup(method, cases[name], args.cgroup_mb, logs)
            print(f"  [cgroup {args.cgroup_mb} MiB] {name} {method.label}: {record['status']}")
            results["cgroup"][f"{name}/{method.label}"] = record | {
                "input": name,
                "method": method.label,
                "limit_mb": args.cgroup_mb,
                "run": run_id,
            }
    save(results, work)
    profiled = next((cases[n] for n in (LARGE, DENSE) if n in cases), None)
    if profiled:
        print(f"profiling a conversion of {profiled.inp.name} with py-spy", flush=True)
        results["profile"] = profile(profiled, logs) | {"run": run_id}
    shutil.rmtree(work / "out", ignore_errors=True)  # hydra's folders, nothing else is left
    save(results, work)


def save(results: dict, work: Path) -> None:
    (work / "results.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work", help="inputs and outputs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--inputs", nargs="+", choices=NAMES, help="only these (default: all); others' results stay"
    )
    parser.add_argument("--small", action="store_true", help="tiny inputs: a smoke run")
    parser.add_argument("--cgroup-mb", type=int, default=512, help="memory cgroup limit")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the reports from results.json"
    )
    parser.add_argument("--build-input", choices=NAMES, help="internal: build one input")
    args = parser.parse_args()
    work = args.work.resolve() / ("small" if args.small else "")
    if args.build_input:
        by_name(args.small, args.build_input).build(work)
        return
    (work / "logs").mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if args.report_only and not results.get("cases"):
        parser.error(f"no results to report in {results_file}")
    if "runs" not in results:  # none yet, or the old benchmark's (which had no run ids)
        if results_file.exists():
            results_file.rename(results_file.with_name("results-old.json"))
        results = {"small": args.small, "runs": {}, "build": {}, "cases": {}, "cgroup": {}}
    if not args.report_only:
        run_all(args, work, results)
    print(write_reports(results, work, work if args.small else HERE))


if __name__ == "__main__":
    main()
