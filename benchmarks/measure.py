"""Running the methods: what each is, its command line, timing it through ``timed.py``,
checking its output against an untimed reference conversion, the memory-cgroup runs and the
py-spy recordings.

A fast wrong output is not a result: every timed output of titan2tune (and the Hugging Face
baseline's ``model.safetensors``) must have, file by file, the XXH3-128 that the reference
conversion's manifest records (``output.files[<name>].xxh3_128``), computed here afresh from
the bytes on disk; the benchmark stops at the first that differs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from inputs import DENSE, FULL_TWIN, LARGE, REPO, Input, file_bytes, write_floor_plan

from converter.digests import file_digest
from converter.formats.torch_save import TORCHTUNE_SUFFIX
from converter.manifest import manifest_path, read_manifest

HERE = Path(__file__).resolve().parent
# The settings a user gets without naming them: read, not assumed, so the "defaults" rows
# follow conf/convert.yaml if its defaults change.
CONF = yaml.safe_load((REPO / "conf" / "convert.yaml").read_text())
EXPORT_DTYPE = "bfloat16"  # every input is float32: titan2tune and the baseline cast


@dataclass(frozen=True)
class Method:
    """One way of producing an output from a step folder."""

    label: str
    kind: str  # ours | dcp | hf_baseline | floor
    verify: bool | None = None  # ours; None: not given, conf/convert.yaml's default applies
    workers: int | None = None  # ours; None: likewise
    tasks: int = 1  # ours, > 1: processes, as the submitit tasks of one job sharing it
    fsync: bool = True  # floor
    write_mib: int = 1  # floor: the most one write call copies
    drop_behind: bool = False  # floor: read back, synced and dropped behind the writes
    output_format: str = "meta"  # ours: meta (a .pt) or hf (a Hugging Face folder)

    @property
    def folder(self) -> bool:
        """It writes a Hugging Face folder, not a .pt."""
        return self.output_format == "hf" or self.kind == "hf_baseline"

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.label).strip("_")

    @property
    def settings(self) -> tuple:
        """What it does, the defaults resolved: two methods alike are one."""
        verify = CONF["verify"] if self.verify is None else self.verify
        workers = CONF["workers"] if self.workers is None else self.workers
        return (
            self.kind,
            verify,
            workers,
            self.tasks,
            self.fsync,
            self.write_mib,
            self.drop_behind,
            self.output_format,
        )


def _ours(
    output_format: str, verify: bool | None = None, workers: int | None = None, tasks: int = 1
) -> Method:
    fmt = " hf" if output_format == "hf" else ""
    if verify is None and workers is None:
        defaults = f"verify={str(CONF['verify']).lower()} workers={CONF['workers']}"
        label = f"titan2tune{fmt} defaults ({defaults})"
    else:
        split = f"{tasks} tasks x workers={workers}" if tasks > 1 else f"workers={workers}"
        label = f"titan2tune{fmt} verify={str(verify).lower()} {split}"
    return Method(label, "ours", verify, workers, tasks, output_format=output_format)


def _distinct(*methods: Method) -> tuple[Method, ...]:
    """``methods`` without any that does what an earlier one does (a named setting that is
    also the default)."""
    seen: dict[tuple, Method] = {}
    for m in methods:
        seen.setdefault(m.settings, m)
    return tuple(seen.values())


DEFAULTS = _ours("meta")
HF_DEFAULTS = _ours("hf")
FAST_1 = _ours("meta", verify=False, workers=1)
FAST_2 = _ours("meta", verify=False, workers=2)
VERIFY_2 = _ours("meta", verify=True, workers=2)
# Two processes instead of two threads: the conversion shared by two tasks
# (converter/tasks.py), launched as a SLURM job's would be, by hydra-submitit-launcher's local
# executor.
TASKS_2 = _ours("meta", verify=False, workers=1, tasks=2)
HF_FAST_2 = _ours("hf", verify=False, workers=2)
HF_VERIFY_2 = _ours("hf", verify=True, workers=2)
DCP = Method("dcp_to_torch", "dcp")
FLOOR = Method("I/O floor (fsync)", "floor", fsync=True)
FLOOR_NOSYNC = Method("I/O floor (no fsync)", "floor", fsync=False)
# The floor as it wrote before: 8 MiB per call (see floor.py).
FLOOR_8MIB = Method("I/O floor (fsync, 8 MiB writes)", "floor", fsync=True, write_mib=8)
# The floor of I/O like the converter's: read back, synced and dropped behind the writes.
FLOOR_DROP = Method("I/O floor (fsync, read back and dropped behind)", "floor", drop_behind=True)
# What a user does today for a Hugging Face checkpoint (llama3 only: torchtitan's adapter).
HF_BASELINE = Method("DCP state dict + to_hf + save_file", "hf_baseline")
LLAMA_METHODS = _distinct(
    DEFAULTS,
    FAST_1,
    FAST_2,
    VERIFY_2,
    TASKS_2,
    DCP,
    FLOOR,
    FLOOR_NOSYNC,
    FLOOR_8MIB,
    HF_DEFAULTS,
    HF_FAST_2,
    HF_VERIFY_2,
    HF_BASELINE,
)
# qwen3 converts to a Hugging Face folder only (no torchtune builder takes its experts).
MOE_METHODS = _distinct(HF_DEFAULTS, HF_FAST_2, DCP, FLOOR, FLOOR_NOSYNC, FLOOR_8MIB)
# The full checkpoint's model saved weights-only: there for the bytes it reads and hashes.
TWIN_METHODS = (DEFAULTS, FLOOR)
# One run each in a memory cgroup: the conversions against dcp_to_torch on the 2.6 GB input,
# and the defaults on the ~10 GB one.
CGROUP_RUNS = {DENSE: _distinct(FAST_1, FAST_2, DEFAULTS, DCP), LARGE: (DEFAULTS,)}
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
PROFILE_RATE = 100  # py-spy samples per second
# The bench extra installs py-spy beside this interpreter, which is not on PATH when the
# virtualenv is used without being activated; one on PATH serves otherwise.
_BESIDE = Path(sysconfig.get_path("scripts")) / "py-spy"
PY_SPY = str(_BESIDE) if _BESIDE.exists() else "py-spy"


def methods_for(inp: Input) -> tuple[Method, ...]:
    if inp.family == "qwen3":
        return MOE_METHODS
    return TWIN_METHODS if inp.name == FULL_TWIN else LLAMA_METHODS


@dataclass
class Case:
    """An input made ready to time: its reference conversions, its floor plan, its runs."""

    inp: Input
    work: Path
    methods: tuple[Method, ...]
    model_bytes: int = 0  # the shard byte ranges holding the output's tensors (the floor reads)
    all_bytes: int = 0  # every file of the step folder
    # Per output format: the reference conversion's digests and what its manifest says.
    reference: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def step_dir(self) -> Path:
        return self.inp.step_dir(self.work)

    @property
    def out_dir(self) -> Path:
        return self.work / "out"

    @property
    def floor_plan(self) -> Path:
        return self.work / f"{self.inp.name}-floor.json"

    @property
    def formats(self) -> list[str]:
        """The output formats its methods write ("hf" for the baseline, compared with ours)."""
        kinds = ("ours", "hf_baseline")
        fmts = {"hf" if m.folder else "meta" for m in self.methods if m.kind in kinds}
        return sorted(fmts, key=lambda f: f != "meta")  # meta first: the floor's plan is its

    def record(self) -> dict:
        """What results.json keeps."""
        keys = ("model_bytes", "all_bytes", "reference", "runs")
        return {k: getattr(self, k) for k in keys}


def converter_argv(case: Case, out: Path, method: Method) -> list[str]:
    """``convert.py`` on ``case`` to ``out`` as ``method`` runs it: settings the method leaves
    unset are not given; with ``tasks`` > 1, as a one-job sweep of that many local submitit
    tasks."""
    hydra_dir = out.parent / "hydra" / out.name
    launch = (
        [
            "-m",
            "hydra/launcher=submitit_local",
            f"hydra.launcher.tasks_per_node={method.tasks}",
            f"hydra.sweep.dir={hydra_dir}",
        ]
        if method.tasks > 1
        else [f"hydra.run.dir={hydra_dir}"]
    )
    settings = [
        *([f"verify={str(method.verify).lower()}"] if method.verify is not None else []),
        *([f"workers={method.workers}"] if method.workers is not None else []),
    ]
    return [
        sys.executable,
        str(REPO / "convert.py"),
        *launch,
        "experiment=debug",
        f"experiment.name={case.inp.name}",
        f"experiment.checkpoint_dir={case.step_dir.parent}",
        f"experiment.step={case.inp.step}",
        f"experiment.output={out}",
        f"output_format={method.output_format}",
        f"experiment.export_dtype={EXPORT_DTYPE}",
        *case.inp.model_overrides(case.work),
        *settings,
        "overwrite=true",
    ]


def command(method: Method, case: Case, out: Path) -> list[str]:
    """The command line with which ``method`` converts ``case`` to ``out``."""
    if method.kind == "ours":
        return converter_argv(case, out, method)
    if method.kind == "hf_baseline":
        return [
            sys.executable,
            str(HERE / "hf_baseline.py"),
            str(case.step_dir),
            str(out),
            *case.inp.baseline_args(),
            f"--export-dtype={EXPORT_DTYPE}",
        ]
    if method.kind == "dcp":
        return [
            sys.executable,
            "-m",
            "torch.distributed.checkpoint.format_utils",
            "dcp_to_torch",
            str(case.step_dir),
            str(out),
        ]
    fsync = ["--fsync"] if method.fsync else []
    writes = ["--write-mib", str(method.write_mib), *(["--drop-behind"] * method.drop_behind)]
    return [sys.executable, str(HERE / "floor.py"), str(case.floor_plan), str(out), *fsync, *writes]


def run_child(argv: list[str], log: Path, cgroup: Path | None = None) -> dict:
    """Runs ``argv`` through ``timed.py`` (in ``cgroup`` if given); returns its ``wall`` and
    ``cpu`` (user + system) seconds, peak RSS ``rss_mb`` and exit ``code``."""
    where = ["--cgroup", str(cgroup)] if cgroup else []
    launcher = [sys.executable, str(HERE / "timed.py"), "--log", str(log), *where, "--"]
    done = subprocess.run([*launcher, *argv], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"timed.py failed: {done.stderr}")
    return json.loads(done.stdout)


def output_path(case: Case, method: Method, prefix: str = "") -> Path:
    """Where ``method`` writes: a .pt, or a folder."""
    name = f"{prefix}{case.inp.name}-{method.slug}"
    return case.out_dir / (name if method.folder else f"{name}.pt")


def remove_outputs(out: Path) -> None:
    """An output: a .pt with the converter's manifest and recipe snippet beside it, or a
    folder."""
    if out.is_dir():
        shutil.rmtree(out)
        return
    for path in (out, manifest_path(out, False), out.with_name(out.name + TORCHTUNE_SUFFIX)):
        path.unlink(missing_ok=True)


def _tensor_file(name: str) -> bool:
    """A file of an output that holds tensors: the .pt (named "" in its manifest) or a shard."""
    return name == "" or name.endswith(".safetensors")


def tensor_digests(out: Path) -> dict[str, str]:
    """The XXH3-128 of each file of ``out`` that holds tensors, by its name in the manifest."""
    if out.is_dir():
        return {p.name: file_digest(p) for p in sorted(out.iterdir()) if _tensor_file(p.name)}
    return {"": file_digest(out)}


def check_output(method: Method, case: Case, out: Path) -> None:
    """``out`` must hold the very bytes of the reference conversion (for the Hugging Face
    baseline: of titan2tune's folder), or the benchmark stops."""
    got = tensor_digests(out)
    expected = case.reference["hf" if method.folder else "meta"]["digests"]
    if got != expected:
        raise RuntimeError(
            f"{method.label} wrote {out} with XXH3-128 {got}, but the reference conversion of "
            f"{case.inp.name} has {expected}: the benchmark stops here."
        )


def output_bytes(out: Path) -> int:
    if out.is_dir():
        return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return out.stat().st_size


def load1() -> float:
    """The 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def warm(step_dir: Path) -> None:
    """Reads every file of ``step_dir`` once, so that a run finds it in the page cache (another
    method may have pushed it out: dcp_to_torch holds the whole checkpoint in memory)."""
    buffer = bytearray(16 << 20)
    for path in step_dir.iterdir():
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def evict(*step_dirs: Path) -> None:
    """Drops the files of ``step_dirs`` from the page cache (written back first). Before each
    input's runs the run's inputs are dropped, so that the runs find their input cached as a
    read puts it there, whenever it was built, and no other input cached beside it, whichever
    ran before. A checkpoint just written by its builder is still cached from the writes, and
    mapped more slowly: for the MoE input, built minutes before, the conversion's mapping of
    the source took 0.23 s instead of 0.07 s after this (the manifest's phases, three runs
    each)."""
    for step_dir in step_dirs:
        for path in step_dir.iterdir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def prepare(case: Case, logs: Path) -> None:
    """Converts once per output format, untimed and verified, for the digests every timed
    output must have and what the manifest says was read; writes the floor's plan from the
    first format's (the shard byte ranges holding the tensors that output needs)."""
    case.out_dir.mkdir(parents=True, exist_ok=True)
    for fmt in case.formats:
        method = _ours(fmt)
        probe = output_path(case, method, "reference-")
        remove_outputs(probe)
        log = logs / f"{case.inp.name}-reference-{fmt}.log"
        code = run_child(converter_argv(case, probe, method), log)["code"]
        if code:
            raise RuntimeError(
                f"the reference conversion of {case.inp.name} exited {code}; see {log}"
            )
        manifest = read_manifest(manifest_path(probe, method.folder))
        files, source = manifest["output"]["files"], manifest["source"]
        case.reference[fmt] = {
            "digests": {n: f["xxh3_128"] for n, f in files.items() if _tensor_file(n)},
            "out_bytes": manifest["output"]["bytes"],
            "parameters": manifest["output"]["parameters"],
            "bytes_read": source["bytes_read"],
            "bytes_hashed": sum(t["bytes"] for t in source["tensors"].values()),
            "keys": sorted({k for keys in manifest["converted"].values() for k in keys}),
        }
        remove_outputs(probe)
    first = case.reference[case.formats[0]]
    case.model_bytes = write_floor_plan(
        case.step_dir, first["keys"], first["out_bytes"], case.floor_plan
    )
    case.all_bytes = file_bytes(case.step_dir)


def measure(method: Method, case: Case, logs: Path) -> dict:
    """One timed run of ``method``, page cache warm; its output is removed and the disk settled
    around it."""
    out = output_path(case, method)
    remove_outputs(out)
    warm(case.step_dir)
    os.sync()
    load = load1()
    log = logs / f"{case.inp.name}-{method.slug}.log"
    record = run_child(command(method, case, out), log)
    start = time.perf_counter()
    os.sync()  # what a method left to write back (dcp_to_torch and the no-fsync floor)
    record |= {"flush": time.perf_counter() - start, "load1": load}
    if record["code"] == 0:
        record["out_bytes"] = output_bytes(out)
        if method.kind == "ours":
            manifest = read_manifest(manifest_path(out, method.folder))
            record["durations"] = manifest["durations_s"]
        if method.kind in ("ours", "hf_baseline"):
            check_output(method, case, out)
    else:
        record["log"] = str(log)
    remove_outputs(out)
    return record


def benchmark(case: Case, repeats: int, logs: Path) -> None:
    """``repeats`` rounds over the case's methods, each round in another order."""
    methods = case.methods
    case.runs = {m.label: [] for m in methods}
    for r in range(repeats):
        order = list(methods[r % len(methods) :] + methods[: r % len(methods)])
        if r % 2:
            order.reverse()
        for method in order:
            record = measure(method, case, logs)
            case.runs[method.label].append(record)
            failed = f"  FAILED (exit {record['code']})" if record["code"] else ""
            print(
                f"  [{case.inp.name} {r + 1}/{repeats}] {method.label:48} "
                f"{record['wall']:7.2f} s {record['rss_mb']:7.0f} MB "
                f"(+{record['flush']:.2f} s flush, load {record['load1']:.1f}){failed}",
                flush=True,
            )


def in_cgroup(method: Method, case: Case, limit_mb: int, logs: Path) -> dict:
    """Runs ``method`` once inside a fresh cgroup v1 memory cgroup capped at ``limit_mb`` MiB
    (page cache charged to it counts: the kernel reclaims it under pressure)."""
    if not (CGROUP_ROOT / "memory.limit_in_bytes").is_file():
        return {"status": f"not run: no cgroup v1 memory controller at {CGROUP_ROOT}"}
    cgroup = CGROUP_ROOT / f"titan2tune-bench-{os.getpid()}"
    out = output_path(case, method, "cgroup-")
    remove_outputs(out)
    warm(case.step_dir)
    os.sync()
    cgroup.mkdir()
    log = logs / f"cgroup-{case.inp.name}-{method.slug}.log"
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(limit_mb << 20))
        record = run_child(command(method, case, out), log, cgroup)
        oom = dict(
            line.split() for line in (cgroup / "memory.oom_control").read_text().splitlines()
        )
        record |= {
            "cgroup_peak_mb": int((cgroup / "memory.max_usage_in_bytes").read_text()) / 1e6,
            "failcnt": int((cgroup / "memory.failcnt").read_text()),
            "oom_kills": int(oom.get("oom_kill", 0)),
        }
        if record["code"] == 0 and method.kind == "ours":
            check_output(method, case, out)
    finally:
        remove_outputs(out)
        os.sync()
        _rmdir_when_empty(cgroup)
    if record["code"] == 0:
        record["status"] = "completed"
    elif record["code"] == -9 and record["oom_kills"]:
        record["status"] = "OOM-killed (exit 137)"
    else:
        record["status"] = f"failed (exit {record['code']}; log `{log.name}`)"
    return record


def _rmdir_when_empty(cgroup: Path) -> None:
    """Removes a cgroup once the kernel has let go of its last task."""
    for _ in range(50):
        try:
            cgroup.rmdir()
            return
        except OSError:  # the killed child's exit may not be accounted yet
            time.sleep(0.1)
    cgroup.rmdir()


def profile(case: Case, logs: Path) -> dict:
    """Records one conversion with the defaults twice with py-spy: with idle threads and
    without pausing the process (--nonblocking: pausing it 100 times a second slows the
    threads it stops), for where the wall time goes; and on-CPU samples only with native
    frames (--native, which must pause it), for which code, library or system call the CPU
    time goes to. Falls back to fewer options where py-spy refuses one. Returns each
    recording's run and raw file, or why there is none."""
    out, result = output_path(case, DEFAULTS, "profile-"), {}
    for mode, options, fallbacks in (
        ("wall", ["--idle"], (["--nonblocking"], [])),
        ("cpu", [], (["--native"], ["--nonblocking"], [])),
    ):
        raw, log = case.work / f"profile-{mode}.txt", logs / f"profile-{mode}.log"
        for sampling in fallbacks:
            remove_outputs(out)
            warm(case.step_dir)
            os.sync()
            pyspy = [PY_SPY, "record", *options, "--threads", "--nolineno", "--rate"]
            pyspy += [str(PROFILE_RATE), "--format", "raw", "-o", str(raw), *sampling, "--"]
            try:
                run = run_child([*pyspy, *converter_argv(case, out, DEFAULTS)], log)
            except RuntimeError as e:  # no py-spy: timed.py could not start it
                return {"error": str(e)}
            if run["code"] == 0:
                check_output(DEFAULTS, case, out)
                remove_outputs(out)
                break
        else:
            remove_outputs(out)
            return {"error": f"py-spy failed with every sampling option; see {log}"}
        result[mode] = run | {"py-spy": pyspy, "sampling": sampling, "raw": str(raw)}
    return result | {"input": case.inp.name, "method": DEFAULTS.label}
