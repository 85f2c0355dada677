"""The reports of a benchmark's results (``<work>/results.json``): RESULTS.md (tables, targets),
results.png (the chart) and PROFILE.md (where one conversion's time goes, by module).

Every figure comes from results.json, which keeps each input's runs with the id of the
benchmark run that made them: inputs timed by different invocations (``--inputs``) are
reported together, and each target names the runs it rests on.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inputs import DENSE, FULL, FULL_TWIN, LARGE, MOE, Input, select
from measure import (
    CONF,
    DCP,
    DEFAULTS,
    EXPORT_DTYPE,
    FAST_2,
    FLOOR,
    HF_BASELINE,
    HF_DEFAULTS,
    PROFILE_RATE,
    Method,
    methods_for,
)

MB = 1e6
# #16's figures from before its changes, which this run's are set beside.
BEFORE_16 = Path(__file__).resolve().parent / "before_16.json"
JOB_PHASES = ("plan", "convert", "other_tasks_wait", "verify", "digest")  # as conversion.py runs


# ------------------------------------------------------------------------------ one input's runs


@dataclass(frozen=True)
class View:
    """One input's results, as results.json keeps them."""

    inp: Input
    data: dict

    @property
    def name(self) -> str:
        return self.inp.name

    @property
    def run(self) -> str:
        return self.data["run"]

    @property
    def methods(self) -> tuple[Method, ...]:
        return tuple(m for m in methods_for(self.inp) if m.label in self.data["runs"])

    def ok(self, m: Method) -> list[dict]:
        """The runs of ``m`` that succeeded."""
        return [r for r in self.data["runs"].get(m.label, []) if r["code"] == 0]

    def failed(self, m: Method) -> str:
        """Which runs of ``m`` failed and where the first one's log is; "" if none did."""
        runs = self.data["runs"].get(m.label, [])
        bad = [r for r in runs if r["code"] != 0]
        if not bad:
            return ""
        codes = sorted({r["code"] for r in bad})
        log = Path(bad[0]["log"]).name
        return f"{len(bad)}/{len(runs)} runs failed (exit {codes}; log `{log}`)"

    def _median(self, m: Method, value: Callable[[dict], float]) -> float:
        """The median of ``value`` over the runs of ``m`` that succeeded (nan if none did)."""
        runs = self.ok(m)
        return statistics.median(value(r) for r in runs) if runs else math.nan

    def median(self, m: Method, key: str) -> float:
        return self._median(m, lambda r: r[key])

    def phase(self, m: Method, phase: str) -> float:
        """A phase of the job's own timing (the manifest's ``durations_s``); nan if none ran
        it (``verify`` with verify=false)."""
        times = [r["durations"][phase] for r in self.ok(m) if phase in r["durations"]]
        return statistics.median(times) if times else math.nan

    def wall_spread(self, m: Method) -> str:
        """The median wall seconds of ``m`` with their min-max ("-" if no run succeeded)."""
        walls = [r["wall"] for r in self.ok(m)]
        if not walls:
            return "-"
        return f"{statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f})"

    def job(self, m: Method) -> float:
        """The job's measured phases together."""
        return self._median(m, lambda r: sum(r["durations"].values()))

    def outside(self, m: Method) -> float:
        """The wall time outside the job's measured phases: start-up and exit."""
        return self._median(m, lambda r: r["wall"] - sum(r["durations"].values()))

    def src_bytes(self, m: Method) -> int:
        """What ``m`` reads: dcp_to_torch every entry, titan2tune what its manifest says, the
        floor and the baseline the shard ranges of the model's tensors."""
        if m.kind == "dcp":
            return self.data["all_bytes"]
        if m.kind == "ours":
            return self.data["reference"]["hf" if m.folder else "meta"]["bytes_read"]
        return self.data["model_bytes"]


def views(results: dict) -> dict[str, View]:
    """The inputs with results, in the benchmark's order."""
    cases = results["cases"]
    return {i.name: View(i, cases[i.name]) for i in select(results["small"]) if i.name in cases}


def _f(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _count(n: int) -> str:
    """A parameter count: 2.31B, 650M, 2.23M."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


# ------------------------------------------------------------------------------ RESULTS.md tables


def inputs_table(vs: dict[str, View], results: dict, work: Path) -> list[str]:
    rows = [
        "| input | model | save | ranks (shard files) | parameters | files MB | model bytes read "
        f"MB | output MB ({EXPORT_DTYPE}) | build s | build peak RSS MB | run |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for v in vs.values():
        inp, b = v.inp, results["build"].get(v.name, {})
        shards = len(list(inp.step_dir(work).glob("*.distcp")))
        refs = v.data["reference"]
        ref = next(iter(refs.values()))
        outs = ", ".join(
            f"{r['out_bytes'] / MB:.0f} ({'.pt' if f == 'meta' else f})" for f, r in refs.items()
        )
        built = f"{b['seconds']:.0f} | {b['peak_rss_mb']:.0f}" if b else "- | -"
        rows.append(
            f"| {v.name} | {inp.describe(work)} | {inp.kind}, {inp.note} | "
            f"{inp.ranks} ({shards}) | "
            f"{_count(ref['parameters'])} | {v.data['all_bytes'] / MB:.0f} | "
            f"{v.data['model_bytes'] / MB:.0f} | {outs} | {built} | {v.run} |"
        )
    return rows


def results_table(v: View) -> list[str]:
    dcp_wall, dcp_rss = v.median(DCP, "wall"), v.median(DCP, "rss_mb")
    floor_wall = v.median(FLOOR, "wall")
    rows = [
        "| method | wall s median (min-max) | + flush s | CPU s | peak RSS MB | output MB | "
        "out MB/s | source MB read | src MB/s | wall / dcp_to_torch | RSS / dcp_to_torch | "
        "wall / floor (fsync) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in v.methods:
        if failed := v.failed(m):
            rows.append(f"| {m.label} | {failed} |" + " |" * 10)
        runs = v.ok(m)
        if not runs:
            continue
        wall, rss = v.median(m, "wall"), v.median(m, "rss_mb")
        out_mb, src_mb = v.median(m, "out_bytes") / MB, v.src_bytes(m) / MB
        rows.append(
            f"| {m.label} | {v.wall_spread(m)} | "
            f"{v.median(m, 'flush'):.2f} | {v.median(m, 'cpu'):.1f} | {rss:.0f} | "
            f"{out_mb:.0f} | {out_mb / wall:.0f} | {src_mb:.0f} | {src_mb / wall:.0f} | "
            f"{_f(_ratio(wall, dcp_wall))} | {_f(_ratio(rss, dcp_rss), 3)} | "
            f"{_f(_ratio(wall, floor_wall))} |"
        )
    return rows


def before_after_table(vs: dict[str, View]) -> list[str]:
    """#16's figures as filed, before its changes, beside this run's medians of the same
    methods on the same input (or a line saying that input is not in the results). Each side
    is set against its own floor: the two were measured on different machines."""
    before = json.loads(BEFORE_16.read_text())
    v = vs.get(before["input"])
    if v is None:
        return [f"Not measured: this run has no `{before['input']}`."]
    after = {"defaults": DEFAULTS, "verify=false workers=2": FAST_2, "dcp_to_torch": DCP,
             "floor": FLOOR}  # fmt: skip
    mid = {r["after"]: statistics.mean(r["wall_s"]) for r in before["rows"]}
    floor_now = v.median(FLOOR, "wall")
    rows = [
        f"Before: {before['measured']} (`{before['commit'][:7]}`). After: this run's medians "
        f"({v.run}). Each side's wall / floor is to its own floor (before: the ranges' "
        "midpoints); the two sides come from different machines, so only those ratios compare.",
        "",
        "| before | wall s | peak RSS MB | wall / floor | after | wall s median (min-max) | "
        "peak RSS MB | wall / floor (fsync) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in before["rows"]:
        m, (lo, hi) = after[r["after"]], r["wall_s"]
        rows.append(
            f"| {r['before']} | {lo:.1f}" + (f"-{hi:.1f}" if hi != lo else "") + " | "
            f"{r['rss_mb']:.0f} | {_f(_ratio(mid[r['after']], mid['floor']))} | {m.label} | "
            f"{v.wall_spread(m)} | {_f(v.median(m, 'rss_mb'), 0)} | "
            f"{_f(_ratio(v.median(m, 'wall'), floor_now))} |"
        )
    return rows


def split_table(vs: dict[str, View]) -> list[str]:
    ours = [(v, m) for v in vs.values() for m in v.methods if m.kind == "ours" and v.ok(m)]
    seen = {p for v, m in ours for r in v.ok(m) for p in r["durations"]}
    phases = [p for p in JOB_PHASES if p in seen] + sorted(seen - set(JOB_PHASES))
    rows = [
        f"| input | method | wall s | {' | '.join(phases)} | outside the job (start-up, exit) "
        "| convert / floor (fsync) |",
        "| --- | --- " + "| ---: " * (len(phases) + 3) + "|",
    ]
    for v, m in ours:
        split = " | ".join(_f(v.phase(m, p)) for p in phases)
        rows.append(
            f"| {v.name} | {m.label} | {v.median(m, 'wall'):.2f} | {split} | "
            f"{_f(v.outside(m))} | {_f(_ratio(v.phase(m, 'convert'), v.median(FLOOR, 'wall')))} |"
        )
    return rows


def hf_table(vs: dict[str, View]) -> list[str]:
    """titan2tune's Hugging Face folder against the state-dict path and its own .pt."""
    rows = [
        "| input | method | wall s | CPU s | peak RSS MB | output MB | wall / baseline | "
        "RSS / baseline | wall / titan2tune .pt defaults |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in vs.values():
        base_wall, base_rss = v.median(HF_BASELINE, "wall"), v.median(HF_BASELINE, "rss_mb")
        pt_wall = v.median(DEFAULTS, "wall")
        for m in v.methods:
            if not (m.folder and v.ok(m)):
                continue
            wall, rss = v.median(m, "wall"), v.median(m, "rss_mb")
            rows.append(
                f"| {v.name} | {m.label} | {wall:.2f} | {v.median(m, 'cpu'):.1f} | {rss:.0f} | "
                f"{v.median(m, 'out_bytes') / MB:.0f} | {_f(_ratio(wall, base_wall))} | "
                f"{_f(_ratio(rss, base_rss), 3)} | {_f(_ratio(wall, pt_wall))} |"
            )
    return rows


def bytes_table(vs: dict[str, View]) -> list[str]:
    """What each conversion read and hashed (the reference conversion's manifest) against the
    checkpoint's files: an optimizer state beside the model must cost neither."""
    rows = [
        "| input | save | files MB | bytes read MB (`source.bytes_read`) | bytes hashed MB "
        "(sum of `source.tensors[*].bytes`) | read / files | run |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for v in vs.values():
        ref, files = next(iter(v.data["reference"].values())), v.data["all_bytes"]
        rows.append(
            f"| {v.name} | {v.inp.kind} | {files / MB:.1f} | {ref['bytes_read'] / MB:.1f} | "
            f"{ref['bytes_hashed'] / MB:.1f} | {ref['bytes_read'] / files:.3f} | {v.run} |"
        )
    return rows


def cgroup_table(cgroup: dict[str, dict]) -> list[str]:
    rows = [
        "| input | method | status | wall s | peak RSS MB (wait4) | cgroup peak MB (incl. page "
        "cache) | failcnt (hits of the limit) | run |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in cgroup.values():
        figures = (
            f"{r['wall']:.2f} | {r['rss_mb']:.0f} | {r['cgroup_peak_mb']:.0f} | {r['failcnt']}"
            if "wall" in r
            else "- | - | - | -"
        )
        rows.append(f"| {r['input']} | {r['method']} | {r['status']} | {figures} | {r['run']} |")
    return rows


# ------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    issue: str
    what: str
    where: str
    value: float  # nan: not measured
    shown: str  # the value with what it is made of
    passed: Callable[[float], bool]
    limit: str
    runs: str

    def row(self) -> list[str]:
        if math.isnan(self.value):
            return [self.issue, self.what, self.where, "-", self.limit, "not measured", self.runs]
        verdict = "pass" if self.passed(self.value) else "**FAIL**"
        return [self.issue, self.what, self.where, self.shown, self.limit, verdict, self.runs]


def _runs(*vs: View | None) -> str:
    return ", ".join(sorted({v.run for v in vs if v}))


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda x: x <= limit


def _ratio_target(
    issue: str, what: str, where: str, on: tuple[View | None, ...], a: float, b: float,
    limit: float, unit: str, at_least: bool = False,
) -> Target:  # fmt: skip
    """``a / b <= limit`` (``>=`` with ``at_least``), measured on the inputs ``on`` (all present,
    or "not measured")."""
    value = _ratio(a, b) if all(on) else math.nan
    digits = 2 if unit == "s" else 0
    shown = f"{value:.2f} ({a:.{digits}f} {unit} / {b:.{digits}f} {unit})"
    if at_least:
        return Target(issue, what, where, value, shown, lambda x: x >= limit, f">= {limit}",
                      _runs(*on))  # fmt: skip
    return Target(issue, what, where, value, shown, _at_most(limit), f"<= {limit}", _runs(*on))


def targets(vs: dict[str, View], cgroup: dict[str, dict]) -> list[Target]:
    """The issues' targets, each from the runs it names; one whose inputs are not all in the
    results is "not measured"."""
    large, dense, full, twin, moe = (vs.get(n) for n in (LARGE, DENSE, FULL, FULL_TWIN, MOE))
    d, hf = DEFAULTS, HF_DEFAULTS

    def med(v: View | None, m: Method, key: str = "wall") -> float:
        return v.median(m, key) if v else math.nan

    def rate(v: View | None, m: Method, job: bool) -> float:
        """Source MB/s over the wall time, or over the job's own phases only."""
        return v.src_bytes(m) / MB / (v.job(m) if job else v.median(m, "wall")) if v else math.nan

    rss_large, rss_dense = med(large, d, "rss_mb"), med(dense, d, "rss_mb")
    flat = abs(_ratio(rss_large, rss_dense) - 1) if large and dense else math.nan
    out = [
        _ratio_target("#16", "wall / I/O floor (fsync), the defaults", f"{LARGE}, {d.label}",
                      (large,), med(large, d), med(large, FLOOR), 1.3, "s"),
        _ratio_target("#16", "wall / dcp_to_torch, the defaults", f"{LARGE}, {d.label}",
                      (large,), med(large, d), med(large, DCP), 0.5, "s"),
        Target("#16", "peak RSS flat at ~2.5 GB and ~10 GB: abs(RSS ratio - 1)",
               f"{LARGE} and {DENSE}, {d.label}", flat,
               f"{_f(flat)} ({rss_large:.0f} MB / {rss_dense:.0f} MB)", _at_most(0.1),
               "<= 0.1", _runs(large, dense)),
        _ratio_target("#16", "hf at the same throughput: hf wall / .pt wall, the defaults",
                      f"{LARGE}, {hf.label}", (large,), med(large, hf), med(large, d), 1.1, "s"),
        _ratio_target("#16", "hf wall / I/O floor (fsync)", f"{LARGE}, {hf.label}", (large,),
                      med(large, hf), med(large, FLOOR), 1.3, "s"),
        _ratio_target("#12", "hf wall / the hf baseline's", f"{DENSE}, {hf.label}", (dense,),
                      med(dense, hf), med(dense, HF_BASELINE), 0.4, "s"),
        _ratio_target("#12", "hf peak RSS / the hf baseline's", f"{DENSE}, {hf.label}",
                      (dense,), med(dense, hf, "rss_mb"), med(dense, HF_BASELINE, "rss_mb"),
                      0.15, "MB"),
        _ratio_target("#12", "hf wall / our .pt conversion's (the defaults)",
                      f"{DENSE}, {hf.label}", (dense,), med(dense, hf), med(dense, d), 1.3, "s"),
        *(
            _ratio_target("#13", f"MoE source MB/s / dense source MB/s ({what})",
                          f"{MOE} vs {DENSE}, {hf.label}", (moe, dense), rate(moe, hf, job),
                          rate(dense, hf, job), 0.8, "MB/s", at_least=True)
            for job, what in ((False, "over the wall time"), (True, "in the job"))
        ),
        _ratio_target("#13", "MoE peak RSS / dense peak RSS", f"{MOE} vs {DENSE}, {hf.label}",
                      (moe, dense), med(moe, hf, "rss_mb"), med(dense, hf, "rss_mb"), 1.1, "MB"),
    ]  # fmt: skip
    # The benchmark's older targets, for the defaults and for the fastest setting.
    for v, limit in ((dense, 0.6), (full, 0.35)):
        for m in (d, FAST_2):
            if v is None:
                continue
            where = f"{v.name}, {m.label}"
            out += [
                _ratio_target("old", "wall / dcp_to_torch", where, (v,), med(v, m),
                              med(v, DCP), limit, "s"),
                _ratio_target("old", "peak RSS / dcp_to_torch", where, (v,),
                              med(v, m, "rss_mb"), med(v, DCP, "rss_mb"), 0.15, "MB"),
                _ratio_target("old", "wall / I/O floor (fsync)", where, (v,), med(v, m),
                              med(v, FLOOR), 1.5, "s"),
            ]  # fmt: skip
    for r in cgroup.values():
        if r["method"] == d.label:
            done = float(r["status"] == "completed") if "wall" in r else math.nan
            out.append(
                Target("old", f"completes in a {r['limit_mb']} MiB memory cgroup",
                       f"{r['input']}, {d.label}", done, r["status"], lambda x: x == 1,
                       "completed", r["run"])
            )  # fmt: skip
    out.append(_bytes_target(full, twin))
    return out


def _bytes_target(full: View | None, twin: View | None) -> Target:
    """The full checkpoint reads and hashes its model's bytes, as the weights-only save of the
    same model does, and none of the optimizer state's."""
    what = (
        "bytes read and hashed do not grow with the optimizer state: max(read, hashed) of the "
        "full checkpoint / bytes read from its model saved weights-only"
    )
    if not (full and twin):
        return Target("bytes", what, f"{FULL} vs {FULL_TWIN}", math.nan, "-", _at_most(1.0),
                      "<= 1.0", _runs(full, twin))  # fmt: skip
    f, t = full.data["reference"]["meta"], twin.data["reference"]["meta"]
    value = max(f["bytes_read"], f["bytes_hashed"]) / t["bytes_read"]
    shown = (
        f"{value:.3f} ({f['bytes_read'] / MB:.1f} MB read and {f['bytes_hashed'] / MB:.1f} MB "
        f"hashed of {full.data['all_bytes'] / MB:.1f} MB of files; weights-only: "
        f"{t['bytes_read'] / MB:.1f} MB read)"
    )
    return Target("bytes", what, f"{FULL} vs {FULL_TWIN}", value, shown, _at_most(1.0), "<= 1.0",
                  _runs(full, twin))  # fmt: skip


def targets_table(ts: list[Target]) -> list[str]:
    rows = [
        "| issue | target | measured on | value | limit | result | run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    return rows + ["| " + " | ".join(t.row()) + " |" for t in ts]


# ------------------------------------------------------------------------------ RESULTS.md


def runs_section(results: dict, vs: dict[str, View]) -> list[str]:
    """Each benchmark run the report draws on: when, where, how, on which commit, under what
    load."""
    used = {v.run for v in vs.values()} | {r["run"] for r in results["cgroup"].values()}
    used |= {results["profile"]["run"]} if "profile" in results else set()
    lines = []
    for run_id, run in results["runs"].items():
        if run_id not in used:
            continue
        loads = [
            r["load1"]
            for v in vs.values()
            if v.run == run_id
            for runs in v.data["runs"].values()
            for r in runs
        ]
        load = (
            f"median {statistics.median(loads):.1f}, min {min(loads):.1f}, max {max(loads):.1f}"
            if loads
            else "no timed runs in this report"
        )
        machine = ", ".join(f"{k} {v}" for k, v in run["machine"].items())
        lines += [
            f"- **Run {run_id}** ({run['date']}): `{run['command']}`, titan2tune "
            f"{run['version']}, {run['repeats']} repeats. Machine: {machine}. Load average "
            f"(1 min) at the start of its timed runs: {load}.",
        ]
    return lines


def results_markdown(results: dict, work: Path) -> str:
    vs = views(results)
    cgroup = results["cgroup"]
    lines = [
        "# Benchmark results",
        "",
        *(
            [
                "**A `--small` smoke run: tiny stand-ins for every input. These figures test "
                "the benchmark, not the converter.**",
                "",
            ]
            if results["small"]
            else []
        ),
        *runs_section(results, vs),
        "",
        "The 1-minute load average trails, and counts the benchmark's own runs (most keep two "
        "threads busy), so it reads near the core count even when nothing else runs.",
        "",
        "Every method runs as a subprocess of the stdlib-only launcher `benchmarks/timed.py`, "
        "which takes the wall time around it (`time.perf_counter`) and its peak RSS "
        "(`ru_maxrss`) and CPU seconds (user + system) from `os.wait4`; the launcher keeps the "
        "torch-holding benchmark process out of the child's RSS high-water mark. CPU seconds "
        "grow far less with the machine's load than wall time does. Medians over the repeats; "
        "each repeat runs every method in another order, each run after reading the input "
        "once, so that the page cache is warm. titan2tune's defaults are what a user gets "
        f"without settings (conf/convert.yaml: verify={str(CONF['verify']).lower()}, "
        f"workers={CONF['workers']}). titan2tune and the Hugging Face baseline cast float32 "
        f"-> {EXPORT_DTYPE}; `dcp_to_torch` writes the whole state dict as stored (float32, "
        "and the optimizer state of a full checkpoint). Every output of titan2tune and the "
        "baseline's `model.safetensors` must have, file by file, the XXH3-128 recorded by an "
        "untimed, verified reference conversion, or the benchmark stops. The I/O floor "
        "(`benchmarks/floor.py`) reads the shard byte ranges holding the tensors titan2tune's "
        "output needs and writes as many bytes as that output with plain file calls, at most "
        "1 MiB per write as titan2tune's writes (the `8 MiB writes` row writes as the floor "
        "did before it took 1 MiB calls: see converter/filler.py for why the size matters); "
        "**ratios to the floor use the fsync variant**, since titan2tune fsyncs its output "
        "before publishing it. `+ flush s` is the `sync` after a run: what it left for the kernel "
        "to write back (dcp_to_torch does not fsync, so its wall time leaves that out; the "
        "sync is system-wide, so other work's writes land there too). MB = 10^6 bytes.",
        "",
        "## Targets",
        "",
        "The issues' targets: #16 on the ~10 GB input with the defaults a user gets; #12 the "
        "Hugging Face export of the 2.6 GB input; #13 the MoE input against the dense input of "
        "its size (2.5 and 2.6 GB: the interpreter's start-up, about 1.1 s whatever the size, "
        "weighs the same on both) with the same method: its MB/s over the wall time and over "
        "the job's own phases (the manifest's `durations_s`), and its peak RSS. "
        "Then the benchmark's older targets (wall <= 0.6x dcp_to_torch "
        "on the weights-only checkpoint and <= 0.35x on the full one, peak RSS <= 0.15x, wall "
        "<= 1.5x the floor; the memory cgroup), for the defaults and for verify=false "
        "workers=2, and that the full checkpoint's conversion reads and hashes no more than "
        "its model saved weights-only (see Bytes read and hashed). Values are medians of the "
        "runs named in the last column.",
        "",
        *targets_table(targets(vs, cgroup)),
        "",
        "## Inputs",
        "",
        "Real multi-rank DCP saves in torchtitan 0.3.0's layout, float32: llama3 by "
        "`demo.writer` (FSDP2 ranks, each seeding its own shards), qwen3 by torchtitan's own "
        "CheckpointManager (`tests/peers/qwen3_writer.py`, the model-only save of a one-step "
        "run). The model bytes read are the shard byte ranges of the tensors the output needs "
        "(the floor's plan).",
        "",
        *inputs_table(vs, results, work),
        "",
    ]
    for v in vs.values():
        lines += [f"## {v.name}", "", *results_table(v), ""]
    lines += [
        "## titan2tune's own timing split",
        "",
        "Medians of the manifest's `durations_s` (`convert` includes the output's fsync; "
        "`verify` or, with verify=false, `digest` is the one read-back pass over the output). "
        "`outside the job` is the rest of the wall time: Python start, importing torch and "
        "Hydra, composing the config, exit. The last column sets the in-process conversion "
        "alone (streaming plus fsync) against the floor.",
        "",
        *split_table(vs),
        "",
        "## #16 before and after",
        "",
        *before_after_table(vs),
        "",
        "## Hugging Face export",
        "",
        "`output_format=hf` against what a user does today, `benchmarks/hf_baseline.py` "
        "(llama3 only): the model's entries of the DCP loaded into a state dict, torchtitan's "
        "`to_hf`, the cast, `safetensors.torch.save_file`. Both write the same bytes (checked "
        "on every run).",
        "",
        *hf_table(vs),
        "",
        "## Bytes read and hashed",
        "",
        "From each input's reference conversion's manifest: `source.bytes_read` (the tensors "
        "read) and the sum of `source.tensors[*].bytes` (what was hashed, each source tensor's "
        f"XXH3-128), against the checkpoint's files. {FULL} holds AdamW's two moments beside "
        f"the model; {FULL_TWIN} is the same model saved weights-only.",
        "",
        *bytes_table(vs),
        "",
        "## In a memory cgroup",
        "",
        "One run each, cgroup v1 `memory.limit_in_bytes`; the cgroup's peak counts page cache "
        "too, which the kernel reclaims under pressure.",
        "",
        *cgroup_table(cgroup),
        "",
        "![wall time and peak RSS](results.png)",
        "",
    ]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    """Per input, bar charts of median wall time (min-max; the share outside the job hatched)
    and peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = list(views(results).values())
    fig, axes = plt.subplots(len(vs), 2, figsize=(16, 4 * len(vs)), squeeze=False)
    palette = {"ours": "C0", "dcp": "C3", "hf_baseline": "C1"}
    for (wall_ax, rss_ax), v in zip(axes, vs, strict=True):
        done = [m for m in v.methods if v.ok(m)]
        labels = [m.label for m in done]
        colors = [palette.get(m.kind, "C7") for m in done]
        walls = [v.median(m, "wall") for m in done]
        spans = [[r["wall"] for r in v.ok(m)] for m in done]
        err = [
            [w - min(s) for w, s in zip(walls, spans, strict=True)],
            [max(s) - w for w, s in zip(walls, spans, strict=True)],
        ]
        wall_ax.barh(labels, walls, xerr=err, color=colors)
        outside = [v.outside(m) if m.kind == "ours" else 0 for m in done]
        wall_ax.barh(labels, outside, fill=False, hatch="//", edgecolor="white", linewidth=0)
        wall_ax.set_title(f"{v.name}: wall time (s), hatched: outside the job")
        failed = [m.label for m in v.methods if m not in done]
        if failed:
            wall_ax.set_xlabel("no successful run: " + ", ".join(failed))
        rss_ax.barh(labels, [v.median(m, "rss_mb") for m in done], color=colors)
        rss_ax.set_title(f"{v.name}: peak RSS (MB)")
        rss_ax.set_yticks([])
        for ax in (wall_ax, rss_ax):
            ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------ PROFILE.md


@dataclass(frozen=True)
class Frame:
    name: str  # function or symbol
    where: str  # a Python file relative to its sys.path entry, or a native library

    @property
    def python(self) -> bool:
        """Python code: a file, or code made at run time (``<string>``, ``<frozen ...>``)."""
        return self.where.endswith(".py") or self.where.startswith("<")


Stack = list[Frame]  # outermost first
Samples = list[tuple[Stack, int]]  # stacks and their sample counts


def read_samples(raw: Path) -> dict[str, Samples]:
    """py-spy's raw output by thread id. A sample is one line ending in its count, unless a
    frame's name held a newline (a stack read while it changed, without pausing the process):
    lines are joined until one ends in a count."""
    threads: dict[str, Samples] = {}
    pending = ""
    for line in raw.read_text().splitlines():
        pending = f"{pending}\n{line}" if pending else line
        stack, _, count = pending.rpartition(" ")
        if not (stack and count.isdigit()):
            continue
        pending = ""
        head, *frames = stack.split(";")
        tid = head.split(")")[0].removeprefix("thread (")  # "thread (12): MainThread" -> "12"
        parsed = []
        for frame in frames:
            name, _, where = frame.rpartition(" (")
            # "engine.py:218" if recorded with line numbers: the module is the file.
            parsed.append(Frame(name, re.sub(r":\d+$", "", where.removesuffix(")"))))
        threads.setdefault(tid, []).append((parsed, int(count)))
    return threads


STDLIB = "python stdlib"


def module(frame: Frame) -> str:
    """The module a Python frame runs in: a converter file by its path, any other package by
    its name, the standard library (and code made at run time) as one."""
    where = frame.where
    if where.startswith("converter/") or where == "convert.py":
        return where
    top = where.split("/")[0].removesuffix(".py")
    return STDLIB if where.startswith("<") or top in sys.stdlib_module_names else top


def _python(stack: Stack) -> list[Frame]:
    return [f for f in stack if f.python]


def _importing(stack: Stack) -> str | None:
    """While an import runs (importlib on the stack): the package whose module body is
    executing."""
    if not any(f.where.startswith("<frozen importlib") for f in stack):
        return None
    bodies = [f for f in stack if f.name == "<module>" and f.where != "convert.py"]
    return f"start-up: importing {module(bodies[-1]).split('/')[0] if bodies else STDLIB}"


def owner(stack: Stack) -> str:
    """Which module a sample's time belongs to: the package being imported, else the innermost
    converter module (the phase: a thread waiting in converter/engine.py waits for the
    conversion), else the innermost Python frame's package."""
    if importing := _importing(stack):
        return importing
    py = _python(stack)
    mine = [f for f in py if f.where.startswith("converter/")]
    return module((mine or py)[-1]) if py else "native code only"


def innermost(stack: Stack) -> str:
    """The module of the innermost Python frame: where a thread is, whoever called it."""
    py = _python(stack)
    return module(py[-1]) if py else "native code only"


# Standard-library modules whose own code only waits (a lock, a condition, an idle pool worker
# waiting for work): a sample whose innermost Python frame is in one waits, though py-spy's
# native sampling counts some such samples as active.
WAIT_MODULES = (
    "threading.py", "queue.py", "concurrent/futures/thread.py", "concurrent/futures/_base.py"
)  # fmt: skip
WAITING = "waiting (for the GIL, a lock, a condition)"
# System calls by their libc wrapper's name (underscores, __GI_, libc_ and a 64 suffix cut off).
SYSCALLS = {
    "kernel: write (pwrite)": ("pwrite", "pwritev", "write", "writev"),
    "kernel: read (pread)": ("pread", "preadv", "read", "readv"),
    "kernel: fsync": ("fsync", "fdatasync", "sync_file_range"),
    "kernel: mmap, munmap, madvise": ("mmap", "munmap", "madvise", "mremap"),
    "kernel: open, stat, close": ("open", "openat", "stat", "fstat", "fstatat", "close"),
}
# Other native code by the start of its symbol.
SYMBOLS = {
    WAITING: ("pthread_cond_", "PyThread_acquire_lock", "take_gil", "sem_wait", "futex"),
    "malloc, free": ("malloc", "free", "realloc", "calloc", "operator new"),
    "memcpy, memset": ("memcpy", "memmove", "memset"),
}


def native(stack: Stack) -> str | None:
    """The library or system call a sample is in, if py-spy recorded native frames: the first
    native frame from the innermost outwards that names one (system calls and waits by their
    libc symbol; torch and xxhash by library, symbol or source file)."""
    for f in reversed(stack):
        if f.python:
            return None
        base = re.sub(r"^(_*GI_)?_*(libc_)?", "", f.name).removesuffix("64")
        for label, names in SYSCALLS.items():
            if base in names:
                return label
        for label, starts in SYMBOLS.items():
            if base.startswith(starts):
                return label
        if "xxh" in f.name.lower() or "xxhash" in f.where:
            return "xxhash (hashing)"
        if f.where.startswith(("libtorch", "libc10", "libgomp")) or f.name.startswith(
            ("at::", "c10::", "torch::")
        ):
            return "torch kernels (C++)"
    return None


def where_cpu(stack: Stack) -> str:
    """Where a CPU sample runs: a library or system call, else the Python code of a module."""
    return native(stack) or f"{owner(stack)} (Python)"


def _waiting(stack: Stack) -> bool:
    py = _python(stack)
    return native(stack) == WAITING or (bool(py) and py[-1].where in WAIT_MODULES)


def role(samples: Samples) -> str:
    """A thread's role: the main thread runs convert.py; any other is named by the outermost
    module outside the standard library its stacks reach (converter/engine.py: a convert
    worker), or the standard library's if none ever does."""
    if any(f.where == "convert.py" for stack, _ in samples for f in stack):
        return "main"
    starts: Counter[str] = Counter()
    for stack, n in samples:
        outer = [module(f) for f in _python(stack) if module(f) != STDLIB]
        if outer:
            starts[outer[0]] += n
    return starts.most_common(1)[0][0] if starts else STDLIB


def _by(samples: Samples, key: Callable[[Stack], str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for stack, n in samples:
        counts[key(stack)] += n
    return counts


def _table(heads: list[str], counts: Counter[str], top: int = 25) -> list[str]:
    """Seconds and shares of the ``top`` largest ``counts`` and of the rest, keys split on
    " | " into the columns ``heads``."""
    total = sum(counts.values()) or 1
    shown = counts.most_common(top)
    rest = total - sum(v for _, v in shown)
    rows = [f"| {k} | {v / PROFILE_RATE:.2f} | {100 * v / total:.0f} |" for k, v in shown]
    if len(counts) > top:
        others = " | ".join([f"{len(counts) - top} others"] + [""] * (len(heads) - 1))
        rows.append(f"| {others} | {rest / PROFILE_RATE:.2f} | {100 * rest / total:.0f} |")
    return [f"| {' | '.join(heads)} | s | % |", "| --- " * len(heads) + "| ---: | ---: |", *rows]


def profile_markdown(prof: dict, results: dict) -> str:
    if "error" in prof:
        return f"# Where a conversion's time goes\n\nNo profile: {prof['error']}\n"
    wall, cpu = prof["wall"], prof["cpu"]
    wall_threads, cpu_threads = read_samples(Path(wall["raw"])), read_samples(Path(cpu["raw"]))
    roles = {tid: role(s) for tid, s in wall_threads.items()}
    main = [x for tid, s in wall_threads.items() if roles[tid] == "main" for x in s]
    per_role: dict[str, Counter[str]] = {}
    for tid, s in wall_threads.items():
        if roles[tid] != "main":
            per_role.setdefault(roles[tid], Counter()).update(_by(s, innermost))
    count = Counter(roles.values())
    active = [x for s in cpu_threads.values() for x in s]
    on_cpu = [x for x in active if not _waiting(x[0])]
    waits = sum(n for _, n in active) - sum(n for _, n in on_cpu)
    pairs = _by(on_cpu, lambda st: f"{owner(st)} | {native(st) or 'its Python code'}")
    small = " (a `--small` smoke run: tiny input, figures meaningless)" if results["small"] else ""
    lines = [
        "# Where a conversion's time goes",
        "",
        f"One conversion with the defaults a user gets ({prof['method']}) of `{prof['input']}`"
        f"{small}, float32 -> {EXPORT_DTYPE}, page cache warm, recorded twice with py-spy at "
        f"{PROFILE_RATE} Hz: once with idle threads, without pausing the process "
        f"(`{' '.join(wall['sampling']) or 'blocking'}`), for where the wall time goes; once "
        f"on-CPU samples only (`{' '.join(cpu['sampling']) or 'blocking'}`), for where the CPU "
        "time goes, down to the library or system call where native frames were recorded. "
        "Time is attributed by module: a converter file, another package, the standard "
        "library, and for native code torch's kernels, xxhash, or the kernel's system calls "
        "(py-spy sees user space only: a system call's time is its libc wrapper's). Run "
        f"{prof['run']}, on the machine and under the load RESULTS.md gives for it.",
        "",
        f"    {shlex.join(wall['py-spy'])} \\",
        "        python convert.py experiment=debug ...",
        "",
        f"Wall time under py-spy: {wall['wall']:.1f} s (wall recording), {cpu['wall']:.1f} s "
        "(CPU recording, slowed by pausing the process for its native stacks).",
        "",
        "## Main thread: the wall time by module",
        "",
        "The innermost converter module on the stack (a thread waiting in "
        "`converter/engine.py` waits for the conversion's workers), or the package being "
        "imported, or the innermost frame's package.",
        "",
        *_table(["module"], _by(main, owner)),
        "",
        "## Other threads: the wall time by module",
        "",
        "Threads are grouped by the outermost module outside the standard library that their "
        "stacks reach (`converter/engine.py`: the convert workers); their time goes to the "
        "module of the innermost Python frame (a thread waiting for work waits in the "
        "standard library).",
        "",
    ]
    for r, counts in per_role.items():
        lines += [f"### {r} ({count[r]} thread{'s' * (count[r] > 1)})", ""]
        lines += [*_table(["module"], counts), ""]
    lines += [
        "## The CPU time, all threads",
        "",
        f"Waits that py-spy sampled as active ({waits / PROFILE_RATE:.2f} s: threads waiting "
        "for the GIL, blocked on a lock or a condition, idle pool workers) are left out.",
        "",
        "Where the CPU runs: native code by library or system call, else a module's Python "
        "code (with the interpreter and unnamed libc frames under it):",
        "",
        *_table(["where"], _by(on_cpu, where_cpu)),
        "",
        "By the module that owns the work (the innermost converter module, else the package), "
        "whatever it calls:",
        "",
        *_table(["module"], _by(on_cpu, owner)),
        "",
        "Module and what it runs in:",
        "",
        *_table(["module", "runs in"], pairs),
        "",
        "## Threads (wall recording)",
        "",
        "| thread | group | sampled s |",
        "| --- | --- | ---: |",
        *(
            f"| {tid} | {roles[tid]} | {sum(n for _, n in s) / PROFILE_RATE:.2f} |"
            for tid, s in wall_threads.items()
        ),
        "",
    ]
    return "\n".join(lines)


def write_reports(results: dict, work: Path, out_dir: Path) -> str:
    """RESULTS.md, results.png and PROFILE.md into ``out_dir``; returns RESULTS.md."""
    report = results_markdown(results, work)
    (out_dir / "RESULTS.md").write_text(report)
    chart(results, out_dir / "results.png")
    if "profile" in results:
        (out_dir / "PROFILE.md").write_text(profile_markdown(results["profile"], results))
    return report
