"""Benchmark titan2tune's converter against ``dcp_to_torch`` and the I/O floor, and its Hugging
Face export against what a user does today (``hf_baseline.py``: the DCP loaded into a state
dict, torchtitan's ``to_hf``, ``safetensors.torch.save_file``).

    python benchmarks/run.py --work benchmarks/work --repeats 3
    python benchmarks/run.py --work benchmarks/work --report-only

Builds real two-rank FSDP2 DCP checkpoints once (``converter.demo``), then times each method
as a subprocess of ``timed.py`` (wall, CPU seconds and peak RSS from ``os.wait4``), in another
order every repeat; runs the 2.5 GB conversion in a memory cgroup and profiles one conversion
with py-spy. Keeps the raw results in ``<work>/results.json`` and writes
``benchmarks/RESULTS.md``, ``benchmarks/results.png`` and ``benchmarks/PROFILE.md``. Needs
root for the memory cgroup and for py-spy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from converter.formats.torch_save import TORCHTUNE_SUFFIX
from converter.manifest import file_xxh3, manifest_path, read_manifest
from converter.sources.dcp import DcpIndex
from converter.sources.storage import LocalStorage
from demo import writer as demo

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MB = 1e6


@dataclass(frozen=True)
class Input:
    """A benchmark checkpoint: a model shape and the kind of save."""

    name: str
    shape: demo.ModelShape
    kind: str  # weights_only | full
    step: int

    @property
    def params(self) -> int:
        s = self.shape
        q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        layer = s.dim * (2 * q + 2 * kv + 3 * s.hidden_dim + 2)
        heads = 1 if s.tied_embeddings else 2
        return heads * s.vocab_size * s.dim + s.n_layers * layer + s.dim


INPUTS = (
    # ~650M parameters, float32 weights-only: ~2.6 GB on disk.
    Input(
        "weights_650M",
        demo.ModelShape(
            dim=2048, n_layers=11, n_heads=16, n_kv_heads=8, vocab_size=32000, hidden_dim=5632
        ),
        "weights_only",
        step=1000,
    ),
    # ~180M parameters with AdamW exp_avg/exp_avg_sq: ~2.2 GB on disk, a third of it the model.
    Input(
        "full_180M",
        demo.ModelShape(
            dim=1024, n_layers=10, n_heads=16, n_kv_heads=8, vocab_size=32000, hidden_dim=2816
        ),
        "full",
        step=2,
    ),
)


def build_inputs(work: Path, logs: Path) -> dict[str, dict[str, float]]:
    """Writes each input's step folder unless it is already complete, each in a child process
    (``--build-input``) so that its time and peak RSS are its own; returns those."""
    stats = {}
    for inp in INPUTS:
        if (input_step_dir(work, inp) / ".metadata").is_file():
            continue
        print(f"building {inp.name} ({inp.params / 1e6:.0f}M parameters, {inp.kind})", flush=True)
        log = logs / f"build-{inp.name}.log"
        argv = [
            sys.executable,
            str(HERE / "run.py"),
            "--work",
            str(work),
            "--build-input",
            inp.name,
        ]
        run = run_child(argv, log)
        if run["code"]:
            raise RuntimeError(f"building {inp.name} exited {run['code']}; see {log}")
        stats[inp.name] = {"seconds": run["wall"], "peak_rss_mb": run["rss_mb"]}
        print(f"  done in {run['wall']:.0f} s, peak RSS {run['rss_mb']:.0f} MB", flush=True)
    return stats


def build_input(work: Path, name: str) -> None:
    """One two-rank DCP save of float32 reference weights (``demo.write_step`` spawns ranks)."""
    inp = next(i for i in INPUTS if i.name == name)
    weights = demo.reference_weights(inp.shape, seed=7)
    demo.write_step(
        input_step_dir(work, inp),
        weights,
        inp.shape,
        layout=demo.TORCHTITAN_0_3,
        kind=inp.kind,
        export_dtype=torch.float32,
    )


def input_step_dir(work: Path, inp: Input) -> Path:
    return work / "inputs" / inp.name / f"step-{inp.step}"


@dataclass(frozen=True)
class Method:
    """One way of producing an output from a step folder."""

    label: str
    kind: str  # ours | dcp | hf_baseline | floor
    verify: bool = False
    workers: int = 1
    tasks: int = 1  # > 1: processes, as submitit tasks of one job sharing the conversion
    fsync: bool = True
    output_format: str = "meta"  # ours: meta (a .pt) or hf (a Hugging Face folder)

    @property
    def folder(self) -> bool:
        """It writes a Hugging Face folder, not a .pt."""
        return self.output_format == "hf" or self.kind == "hf_baseline"

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.label).strip("_")


OURS_FAST = Method("titan2tune verify=false workers=1", "ours", verify=False, workers=1)
OURS_FAST_2 = Method("titan2tune verify=false workers=2", "ours", verify=False, workers=2)
OURS_DEFAULT = Method("titan2tune verify=true workers=1", "ours", verify=True, workers=1)
OURS_VERIFY_2 = Method("titan2tune verify=true workers=2", "ours", verify=True, workers=2)
# Two processes instead of two threads: the conversion shared by two tasks (converter/tasks.py),
# launched as a SLURM job's would be, by hydra-submitit-launcher's local executor.
OURS_TASKS_2 = Method(
    "titan2tune verify=false 2 tasks x workers=1", "ours", verify=False, workers=1, tasks=2
)
DCP = Method("dcp_to_torch", "dcp")
FLOOR = Method("I/O floor (fsync)", "floor", fsync=True)
FLOOR_NOSYNC = Method("I/O floor (no fsync)", "floor", fsync=False)
# The Hugging Face export: titan2tune's folder against the state-dict path a user takes today.
OURS_HF = Method("titan2tune hf verify=false workers=2", "ours", workers=2, output_format="hf")
OURS_HF_VERIFY = Method(
    "titan2tune hf verify=true workers=2", "ours", verify=True, workers=2, output_format="hf"
)
HF_BASELINE = Method("DCP state dict + to_hf + save_file", "hf_baseline")
HF_METHODS = (OURS_HF, OURS_HF_VERIFY, HF_BASELINE)
METHODS = (
    OURS_FAST,
    OURS_FAST_2,
    OURS_DEFAULT,
    OURS_VERIFY_2,
    OURS_TASKS_2,
    DCP,
    FLOOR,
    FLOOR_NOSYNC,
    *HF_METHODS,
)
CGROUP_METHODS = (OURS_FAST, OURS_FAST_2, OURS_DEFAULT, DCP)
JOB_ORDER = ("plan", "convert", "verify", "digest", "other_tasks_wait")  # as conversion.py runs
TARGETS = {"weights_only": 0.6, "full": 0.35}  # wall time vs dcp_to_torch
RSS_TARGET, FLOOR_TARGET = 0.15, 1.5
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


@dataclass
class Case:
    """An input made ready to benchmark: where it is and what a conversion reads."""

    inp: Input
    step_dir: Path
    out_dir: Path
    floor_plan: Path
    model_bytes: int  # bytes of the shard ranges holding the output's tensors
    all_bytes: int  # every file of the step folder
    out_bytes: int  # the converter's output
    # Each file's XXH3-128 in the reference (untimed, verified) conversion, per output format.
    out_xxh3: dict[str, dict[str, str]] = field(default_factory=dict)
    runs: dict[str, list[dict]] = field(default_factory=dict)

    def src_bytes(self, method: Method) -> int:
        """What ``method`` reads: dcp_to_torch loads every entry, the others the model's."""
        return self.all_bytes if method.kind == "dcp" else self.model_bytes


def converter_argv(
    case: Case, out: Path, verify: bool, workers: int, tasks: int = 1, output_format: str = "meta"
) -> list[str]:
    """``convert.py`` on ``case`` to ``out``, the model's sizes given as they were saved; with
    ``tasks`` > 1, as a one-job sweep of that many local submitit tasks."""
    s = case.inp.shape
    hydra_dir = out.parent / "hydra" / out.stem
    launch = (
        [
            "-m",
            "hydra/launcher=submitit_local",
            f"hydra.launcher.tasks_per_node={tasks}",
            f"hydra.sweep.dir={hydra_dir}",
        ]
        if tasks > 1
        else [f"hydra.run.dir={hydra_dir}"]
    )
    return [
        sys.executable,
        str(REPO / "convert.py"),
        *launch,
        "experiment=debug",
        f"experiment.name={case.inp.name}",
        f"experiment.checkpoint_dir={case.step_dir.parent}",
        f"experiment.output={out}",
        f"output_format={output_format}",
        "experiment.export_dtype=bfloat16",
        f"experiment.model.n_heads={s.n_heads}",
        f"experiment.model.n_kv_heads={s.n_kv_heads}",
        f"experiment.model.n_layers={s.n_layers}",
        f"experiment.model.dim={s.dim}",
        f"experiment.model.vocab_size={s.vocab_size}",
        f"experiment.model.hidden_dim={s.hidden_dim}",
        f"verify={str(verify).lower()}",
        f"workers={workers}",
        "overwrite=true",
    ]


def command(method: Method, case: Case, out: Path) -> list[str]:
    """The command line with which ``method`` converts ``case`` to ``out``."""
    s = case.inp.shape
    if method.kind == "ours":
        return converter_argv(
            case, out, method.verify, method.workers, method.tasks, method.output_format
        )
    if method.kind == "hf_baseline":
        return [
            sys.executable,
            str(HERE / "hf_baseline.py"),
            str(case.step_dir),
            str(out),
            *(f"--{k}={v}" for k, v in _dims(s).items()),
            *(["--tied"] if s.tied_embeddings else []),
            "--export-dtype=bfloat16",
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
    return [sys.executable, str(HERE / "floor.py"), str(case.floor_plan), str(out), *fsync]


def run_child(argv: list[str], log: Path, cgroup: Path | None = None) -> dict:
    """Runs ``argv`` through ``timed.py`` (in ``cgroup`` if given); returns its ``wall`` and
    ``cpu`` (user + system) seconds, peak RSS ``rss_mb`` and exit ``code``."""
    where = ["--cgroup", str(cgroup)] if cgroup else []
    launcher = [sys.executable, str(HERE / "timed.py"), "--log", str(log), *where, "--"]
    done = subprocess.run([*launcher, *argv], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"timed.py failed: {done.stderr}")
    return json.loads(done.stdout)


def _dims(s: demo.ModelShape) -> dict[str, int]:
    return {
        "dim": s.dim,
        "n-layers": s.n_layers,
        "n-heads": s.n_heads,
        "n-kv-heads": s.n_kv_heads,
        "vocab-size": s.vocab_size,
        "hidden-dim": s.hidden_dim,
    }


def output_path(case: Case, method: Method, prefix: str = "") -> Path:
    """Where ``method`` writes: a .pt, or a folder."""
    return case.out_dir / f"{prefix}{method.slug}{'' if method.folder else '.pt'}"


def remove_outputs(out: Path) -> None:
    """An output: a .pt with the converter's manifest and recipe snippet beside it, or a
    folder."""
    if out.is_dir():
        shutil.rmtree(out)
        return
    for path in (out, manifest_path(out, False), out.with_name(out.name + TORCHTUNE_SUFFIX)):
        path.unlink(missing_ok=True)


def tensor_files(out: Path) -> dict[str, str]:
    """The XXH3-128 of each file that holds tensors: the .pt, or the folder's safetensors."""
    if out.is_dir():
        return {p.name: file_xxh3(p) for p in sorted(out.glob("*.safetensors"))}
    return {"": file_xxh3(out)}


def check_output(method: Method, case: Case, out: Path) -> None:
    """A timed conversion must have written the very bytes of the reference conversion (for
    the Hugging Face baseline: of titan2tune's hf folder): a fast wrong output is not a
    result."""
    digests = tensor_files(out)
    expected = case.out_xxh3["hf" if method.folder else "meta"]
    if digests != expected:
        raise RuntimeError(
            f"{method.label} wrote {out} with XXH3-128 {digests}, but the reference conversion "
            f"of {case.inp.name} has {expected}: the benchmark stops here."
        )


def output_bytes(out: Path) -> int:
    if out.is_dir():
        return sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return out.stat().st_size


def load1() -> float:
    """The 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def measure(method: Method, case: Case, logs: Path) -> dict:
    """One timed run of ``method``; its output is removed and the disk settled around it."""
    out = output_path(case, method)
    remove_outputs(out)
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
            record["durations"] = read_manifest(manifest_path(out, method.folder))["durations_s"]
        if method.kind in ("ours", "hf_baseline"):
            check_output(method, case, out)
    else:
        record["log"] = str(log)
    remove_outputs(out)
    return record


def warm(step_dir: Path) -> None:
    """Reads every file of ``step_dir`` once, so that the runs find it in the page cache."""
    buffer = bytearray(16 << 20)
    for path in step_dir.iterdir():
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def prepare(inp: Input, work: Path, logs: Path) -> Case:
    """Converts once, untimed, to learn the output's size and the source keys it needs, and
    writes the floor's plan: the shard byte ranges holding those keys."""
    step_dir = input_step_dir(work, inp)
    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = DcpIndex(LocalStorage(str(step_dir.parent)), str(step_dir))
    case = Case(inp, step_dir, out_dir, work / f"{inp.name}-floor.json", 0, 0, 0)
    for output_format in ("hf", "meta"):  # the .pt's manifest last: the floor reads its keys
        folder = output_format == "hf"
        probe = out_dir / f"{inp.name}-probe{'_hf' if folder else '.pt'}"
        remove_outputs(probe)
        log = logs / f"{inp.name}-probe-{output_format}.log"
        argv = converter_argv(case, probe, verify=True, workers=1, output_format=output_format)
        code = run_child(argv, log)["code"]
        if code:
            raise RuntimeError(f"the probe conversion of {inp.name} exited {code}; see {log}")
        manifest = read_manifest(manifest_path(probe, folder))
        case.out_xxh3[output_format] = tensor_files(probe)
        remove_outputs(probe)
    keys = sorted({k for sources in manifest["converted"].values() for k in sources})
    reads = sorted(
        (str(c.file), c.offset, c.length) for k in keys for c in checkpoint.tensors[k].chunks
    )
    case.out_bytes = manifest["output"]["bytes"]
    case.model_bytes = sum(length for _, _, length in reads)
    case.all_bytes = sum(p.stat().st_size for p in step_dir.iterdir())
    case.floor_plan.write_text(json.dumps({"reads": reads, "out_bytes": case.out_bytes}))
    return case


def benchmark(case: Case, repeats: int, logs: Path) -> None:
    """``repeats`` rounds over every method, each round in another order, cache warmed first."""
    case.runs = {m.label: [] for m in METHODS}
    for r in range(repeats):
        warm(case.step_dir)
        order = list(METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)])
        if r % 2:
            order.reverse()
        for method in order:
            record = measure(method, case, logs)
            case.runs[method.label].append(record)
            failed = f"  FAILED (exit {record['code']})" if record["code"] else ""
            print(
                f"  [{case.inp.name} {r + 1}/{repeats}] {method.label:36} "
                f"{record['wall']:6.2f} s  {record['rss_mb']:7.0f} MB  "
                f"(+{record['flush']:.2f} s flush, load {record['load1']:.1f}){failed}",
                flush=True,
            )


def in_cgroup(method: Method, case: Case, limit: int, logs: Path) -> dict:
    """Runs ``method`` once inside a fresh cgroup v1 memory cgroup capped at ``limit`` bytes."""
    cgroup = CGROUP_ROOT / f"titan2tune-bench-{os.getpid()}"
    out = output_path(case, method, "cgroup-")
    remove_outputs(out)
    warm(case.step_dir)
    os.sync()
    cgroup.mkdir()
    try:
        (cgroup / "memory.limit_in_bytes").write_text(str(limit))
        log = logs / f"cgroup-{case.inp.name}-{method.slug}.log"
        record = run_child(command(method, case, out), log, cgroup)
        oom = dict(
            line.split() for line in (cgroup / "memory.oom_control").read_text().splitlines()
        )
        record |= {
            "cgroup_peak_mb": int((cgroup / "memory.max_usage_in_bytes").read_text()) / MB,
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
    print(f"  [cgroup {limit >> 20} MiB] {method.label:36} {record['status']}", flush=True)
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


# Profile ------------------------------------------------------------------------------------

PROFILE_RATE = 100  # samples per second
# (label, substrings that must all appear in a sample's stack); the first match names it.
MAIN_PHASES = (
    ("read-back: sha256 of the output (+ xxh3 when verifying)", ("read_back",)),
    ("manifest: waiting for the sources' sha256", ("_hashes",)),
    ("manifest", ("build_manifest",)),
    ("fsync of the output", ("Filler.sync",)),
    ("publish, sidecars", ("OutputFile.publish",)),
    ("publish, sidecars", ("write_atomic",)),
    ("convert: waiting for the workers", ("convert_tensors",)),
    ("skeleton: torch.save under skip_data, offsets", ("OutputFile.create",)),
    ("plan: index, validation, plan", ("_plan (converter/conversion.py)",)),
    ("startup: imports", ("_find_and_load",)),
    ("startup: Hydra config composition, job setup", ("hydra",)),
)
IMPORTS = (
    ("torch.distributed.* (DCP metadata classes, DTensor)", ("<module> (torch/distributed/",)),
    ("torch (the rest)", ("<module> (torch/",)),
    ("hydra", ("<module> (hydra/",)),
    ("omegaconf", ("<module> (omegaconf/",)),
    ("submitit", ("<module> (submitit/",)),
    ("tqdm", ("<module> (tqdm/",)),
)
WORKER_OPS = (
    ("read: blob header (torch.load under skip_data)", ("read_chunk", "serialization.py")),
    ("read: blob zip index", ("storage_records",)),
    ("read: storage bytes (preadv)", ("read_chunk",)),
    ("NaN/Inf check (aminmax)", ("_check_finite",)),
    ("cast to bfloat16 (copy_)", ("_cast_into",)),
    ("pwrite into the output", ("Filler.write",)),
    ("xxh3 digest of the written bytes", ("xxh3",)),
    ("waiting for a pool buffer", ("borrow",)),
)
# Innermost frames of a thread that waits (py-spy's --native sampling counts them as active).
WAITS = ("PyThread_acquire_lock", "pthread_cond_", "sem_wait", "sem_timedwait", "__futex")
CPU_ACTIVITIES = (
    ("sha256 of the source files (own thread)", ("SourceHasher._run",)),
    ("flush-behind: fdatasync (own thread)", ("_Flusher._run",)),
    MAIN_PHASES[0],
    *WORKER_OPS,
    ("progress bar", ("tqdm",)),
    *MAIN_PHASES[1:],
)


def profile(case: Case, work: Path, logs: Path) -> dict:
    """Records one conversion as the targets are measured (verify=false, workers=2) twice with
    py-spy: with idle threads (where the wall time goes) and without (where the CPU time goes).
    Sampled without pausing the process (--nonblocking) where py-spy can: pausing it 100 times
    a second was seen to triple the time of the hashing threads. Returns, per mode, the run
    and its raw file."""
    out, result = case.out_dir / "profile.pt", {}
    for mode, idle in (("wall", ["--idle"]), ("cpu", [])):
        raw, log = work / f"profile-{mode}.txt", logs / f"profile-{mode}.log"
        for sampling in (["--nonblocking"], ["--native"], []):
            remove_outputs(out)
            warm(case.step_dir)
            os.sync()
            pyspy = ["py-spy", "record", *idle, "--threads", "--nolineno", "--rate"]
            pyspy += [str(PROFILE_RATE), "--format", "raw", "-o", str(raw), *sampling, "--"]
            run = run_child([*pyspy, *converter_argv(case, out, False, 2)], log)
            remove_outputs(out)
            if run["code"] == 0:
                break
        else:
            raise RuntimeError(f"py-spy failed; see {log}")
        result[mode] = run | {"py-spy": pyspy, "native": "--native" in sampling, "raw": str(raw)}
    return result


def read_samples(raw: Path) -> dict[str, list[tuple[list[str], int]]]:
    """py-spy's raw output as thread id -> [(frames outermost first, sample count)]."""
    threads: dict[str, list[tuple[list[str], int]]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        tid = frames[0].split(")")[0]  # "thread (123): MainThread" -> "thread (123"
        threads.setdefault(tid, []).append((frames, int(count)))
    return threads


def _classify(samples: list[tuple[list[str], int]], rules: tuple) -> dict[str, int]:
    """Sample counts per label of the first rule whose substrings all occur in the stack."""
    counts: dict[str, int] = {}
    for frames, n in samples:
        stack = ";".join(frames)
        label = next((lab for lab, subs in rules if all(s in stack for s in subs)), "other")
        counts[label] = counts.get(label, 0) + n
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _thread_role(samples: list[tuple[list[str], int]]) -> str:
    stacks = ";".join(";".join(frames) for frames, _ in samples)
    for role, marker in (
        ("main", "MainThread"),
        ("convert worker", "convert_source"),
        ("sha256 of the sources", "SourceHasher._run"),
        ("flush-behind", "_Flusher._run"),
        ("tqdm monitor", "tqdm"),
    ):
        if marker in stacks:
            return role
    return "other"


def _leaf(frames: list[str]) -> str:
    """The innermost named frame (native frames py-spy could not name are addresses), with
    C++ argument lists and template arguments cut off."""
    frame = next((f for f in reversed(frames) if not f.startswith("0x")), frames[-1])
    name, _, where = frame.rpartition(" (")
    if "::" in name:
        name = name.replace("(anonymous namespace)::", "")
        name = name[: min((i for i in (name.find("("), name.find("<")) if i > 0), default=None)]
    return f"{name} ({where}"


def _table(head: str, counts: dict[str, int], total: int, code: bool = False) -> list[str]:
    tick = "`" if code else ""
    return [
        f"| {head} | s | % |",
        "| --- | ---: | ---: |",
        *(
            f"| {tick}{k}{tick} | {v / PROFILE_RATE:.2f} | {100 * v / total:.0f} |"
            for k, v in counts.items()
        ),
    ]


def profile_markdown(prof: dict, case: Case) -> str:
    wall, cpu = prof["wall"], prof["cpu"]
    wall_threads, cpu_threads = read_samples(Path(wall["raw"])), read_samples(Path(cpu["raw"]))
    roles = {tid: _thread_role(s) for tid, s in wall_threads.items()}
    main = next(s for tid, s in wall_threads.items() if roles[tid] == "main")
    worker = [x for tid, s in wall_threads.items() if roles[tid] == "convert worker" for x in s]
    phases = _classify(main, MAIN_PHASES)
    imports = _classify([x for x in main if "_find_and_load" in ";".join(x[0])], IMPORTS)
    ops = _classify(worker, WORKER_OPS)
    active = [x for s in cpu_threads.values() for x in s]
    on_cpu = [x for x in active if not _leaf(x[0]).startswith(WAITS)]
    waits = sum(n for _, n in active) - sum(n for _, n in on_cpu)
    activities = _classify(on_cpu, CPU_ACTIVITIES)
    leaves: dict[str, int] = {}
    for frames, n in on_cpu:
        leaves[_leaf(frames)] = leaves.get(_leaf(frames), 0) + n
    top = dict(sorted(leaves.items(), key=lambda kv: -kv[1])[:15])
    main_total, worker_total = sum(phases.values()), sum(ops.values()) or 1
    cpu_total = sum(activities.values())
    lines = [
        "# Where a conversion's time goes",
        "",
        f"One conversion (verify=false, workers=2, as the targets are measured) of "
        f"`{case.inp.name}` "
        f"({case.inp.params / 1e6:.0f}M parameters, float32 -> bfloat16), page cache warm, "
        f"recorded twice with py-spy at {PROFILE_RATE} Hz"
        f"{', native frames included' if wall['native'] else ''}: once with idle threads "
        "(where the wall time goes) and once without (where the CPU time goes). Written by "
        "`benchmarks/run.py`, on the machine and under the load described in RESULTS.md: "
        "with other work on the two cores, waits for a core show up as time in whatever "
        "was running.",
        "",
        f"    {shlex.join(wall['py-spy'])} \\",
        "        python convert.py experiment=debug ... verify=false workers=2",
        "",
        f"Wall time under py-spy: {wall['wall']:.1f} s with idle threads, {cpu['wall']:.1f} s "
        "without.",
        "",
        "## Main thread: the wall time, phase by phase",
        "",
        *_table("phase", phases, main_total),
        "",
        "Imports on the main thread, by package (torch.distributed counted apart from torch):",
        "",
        *_table("package", imports, main_total),
        "",
        "## The CPU time, all threads",
        "",
        f"Lock and condition waits that py-spy samples as active ({waits / PROFILE_RATE:.2f} s: "
        "the progress bar's monitor, the main thread waiting for the workers) are left out.",
        "",
        *_table("activity", activities, cpu_total),
        "",
        "Innermost frames on the CPU (self time, native where py-spy could name it):",
        "",
        *_table("frame", top, cpu_total, code=True),
        "",
        "## The convert worker's wall time: what streaming a chunk costs",
        "",
        *_table("operation", ops, worker_total),
        "",
        "## Threads (wall-time recording)",
        "",
        "| thread | role | sampled s |",
        "| --- | --- | ---: |",
        *(
            f"| {tid.removeprefix('thread (')} | {roles[tid]} | "
            f"{sum(n for _, n in s) / PROFILE_RATE:.2f} |"
            for tid, s in wall_threads.items()
        ),
        "",
        "## Reading",
        "",
        _profile_paragraph(phases, activities, main_total, cpu_total),
        "",
    ]
    return "\n".join(lines)


def _profile_paragraph(
    phases: dict[str, int], activities: dict[str, int], main_total: int, cpu_total: int
) -> str:
    def share(counts: dict[str, int], prefixes: tuple[str, ...], total: int) -> float:
        return 100 * sum(v for k, v in counts.items() if k.startswith(prefixes)) / total

    startup = share(phases, ("startup", "other"), main_total)
    top = ", ".join(f"{k} {100 * v / cpu_total:.0f}%" for k, v in list(activities.items())[:5])
    return (
        f"Of the wall time, {startup:.0f}% passes outside the conversion job (interpreter "
        "start, importing torch and Hydra, composing the config, exit), "
        f"{share(phases, ('plan', 'skeleton'), main_total):.0f}% in planning and writing the "
        f"skeleton, {share(phases, ('convert',), main_total):.0f}% streaming the tensors, "
        f"{share(phases, ('fsync',), main_total):.0f}% in the output's fsync, "
        f"{share(phases, ('read-back',), main_total):.0f}% reading the output back (sha256, "
        f"verify) and {share(phases, ('manifest',), main_total):.0f}% on the manifest. The CPU "
        "time goes "
        f"to: {top}. The bytes themselves (reading the shards, casting, writing) take "
        f"{share(activities, ('read:', 'cast', 'pwrite'), cpu_total):.0f}% of it."
    )


# Report -------------------------------------------------------------------------------------


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
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def source_version() -> str:
    """The repository's commit, and whether the converter's code differs from it."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "converter", "conf", "convert.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"commit {head}" + (" with uncommitted changes to the converter" if dirty else "")


def _ok(case: Case, method: Method) -> list[dict]:
    """The runs of ``method`` that succeeded."""
    return [r for r in case.runs.get(method.label, []) if r["code"] == 0]


def _median(case: Case, method: Method, key: str) -> float:
    runs = _ok(case, method)
    return statistics.median(r[key] for r in runs) if runs else math.nan


def _phase(case: Case, method: Method, phase: str) -> str:
    """Median seconds of one phase of the converter's own timing, or "-" if it did not run."""
    times = [r["durations"][phase] for r in _ok(case, method) if phase in r["durations"]]
    return f"{statistics.median(times):.2f}" if times else "-"


def _median_phase(case: Case, method: Method, phase: str) -> float:
    return statistics.median(r["durations"][phase] for r in _ok(case, method))


def _outside(case: Case, method: Method) -> float:
    """Median wall time outside the job's measured phases: start-up and exit."""
    return statistics.median(r["wall"] - sum(r["durations"].values()) for r in _ok(case, method))


def _failures(case: Case, method: Method) -> str:
    failed = [r for r in case.runs[method.label] if r["code"] != 0]
    codes = sorted({r["code"] for r in failed})
    total, log = len(case.runs[method.label]), Path(failed[0]["log"]).name
    return f"{len(failed)}/{total} runs failed (exit {codes}; log `{log}`)"


def results_table(case: Case) -> list[str]:
    dcp_wall, dcp_rss = _median(case, DCP, "wall"), _median(case, DCP, "rss_mb")
    floor_wall = _median(case, FLOOR, "wall")
    rows = [
        "| method | wall s (min-max) | + flush s | CPU s | peak RSS MB | output MB | out MB/s | "
        "source MB read | src MB/s | wall / dcp_to_torch | RSS / dcp_to_torch | "
        "wall / floor (fsync) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in METHODS:
        runs = _ok(case, m)
        if len(runs) < len(case.runs.get(m.label, [])):
            rows.append(f"| {m.label} | {_failures(case, m)} |" + " |" * 10)
        if not runs:
            continue
        walls = [r["wall"] for r in runs]
        wall, rss = statistics.median(walls), _median(case, m, "rss_mb")
        out_mb, src_mb = _median(case, m, "out_bytes") / MB, case.src_bytes(m) / MB
        rows.append(
            f"| {m.label} | {wall:.2f} ({min(walls):.2f}-{max(walls):.2f}) | "
            f"{_median(case, m, 'flush'):.2f} | {_median(case, m, 'cpu'):.1f} | {rss:.0f} | "
            f"{out_mb:.0f} | {out_mb / wall:.0f} | "
            f"{src_mb:.0f} | {src_mb / wall:.0f} | {wall / dcp_wall:.2f} | {rss / dcp_rss:.3f} | "
            f"{wall / floor_wall:.2f} |"
        )
    return rows


def split_table(cases: list[Case]) -> list[str]:
    ours = [m for m in METHODS if m.kind == "ours"]
    seen = {k for c in cases for m in ours for r in _ok(c, m) for k in r["durations"]}
    phases = sorted(seen, key=lambda k: (JOB_ORDER + (k,)).index(k))
    rows = [
        f"| input | method | wall s | {' | '.join(phases)} | outside the job (start-up, exit) "
        "| convert / floor (fsync) |",
        "| --- | --- " + "| ---: " * (len(phases) + 3) + "|",
    ]
    for case in cases:
        for m in ours:
            if not _ok(case, m):
                continue
            split = " | ".join(_phase(case, m, p) for p in phases)
            rows.append(
                f"| {case.inp.name} | {m.label} | {_median(case, m, 'wall'):.2f} | {split} | "
                f"{_outside(case, m):.2f} | "
                f"{_median_phase(case, m, 'convert') / _median(case, FLOOR, 'wall'):.2f} |"
            )
    return rows


def targets_table(cases: list[Case], cgroup: dict[str, dict]) -> list[str]:
    def mark(value: float, limit: float) -> str:
        return f"{value:.2f}: " + ("met" if value <= limit else "**missed**")

    rows = [
        "| input | method | wall / dcp_to_torch (target) | RSS / dcp_to_torch (<= 0.15) | "
        "wall / floor (<= 1.5) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        dcp_wall, dcp_rss = _median(case, DCP, "wall"), _median(case, DCP, "rss_mb")
        floor_wall, target = _median(case, FLOOR, "wall"), TARGETS[case.inp.kind]
        for m in METHODS:
            if m.kind != "ours" or m.folder:  # the targets are the .pt's
                continue
            label = f"{m.label}{' (alongside)' if m.verify else ''}"
            if len(_ok(case, m)) < len(case.runs[m.label]):
                rows.append(f"| {case.inp.name} | {label} | **missed**: {_failures(case, m)} | | |")
                continue
            wall, rss = _median(case, m, "wall"), _median(case, m, "rss_mb")
            rows.append(
                f"| {case.inp.name} | {label} | {mark(wall / dcp_wall, target)} (<= {target}) | "
                f"{mark(rss / dcp_rss, RSS_TARGET)} | {mark(wall / floor_wall, FLOOR_TARGET)} |"
            )
    ours = {k: r["status"] for k, r in cgroup.items() if k != DCP.label}
    rows += [
        "",
        "Memory cgroup: "
        + ", ".join(f"{k}: {v}" for k, v in ours.items())
        + f"; dcp_to_torch: {cgroup[DCP.label]['status']}.",
    ]
    return rows


def hf_table(cases: list[Case]) -> list[str]:
    """titan2tune's Hugging Face folder against the state-dict path, on the same input."""
    rows = [
        "| input | method | wall s | CPU s | peak RSS MB | output MB | wall / baseline | "
        "RSS / baseline |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        base_wall, base_rss = (
            _median(case, HF_BASELINE, "wall"),
            _median(case, HF_BASELINE, "rss_mb"),
        )
        for m in HF_METHODS:
            if not _ok(case, m):
                continue
            wall, rss = _median(case, m, "wall"), _median(case, m, "rss_mb")
            rows.append(
                f"| {case.inp.name} | {m.label} | {wall:.2f} | {_median(case, m, 'cpu'):.1f} | "
                f"{rss:.0f} | {_median(case, m, 'out_bytes') / MB:.0f} | "
                f"{wall / base_wall:.2f} | {rss / base_rss:.3f} |"
            )
    return rows


def cgroup_table(cgroup: dict[str, dict]) -> list[str]:
    rows = [
        "| method | status | wall s | peak RSS MB (wait4) | cgroup peak MB (incl. page cache) "
        "| failcnt (hits of the limit) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for label, r in cgroup.items():
        rows.append(
            f"| {label} | {r['status']} | {r['wall']:.2f} | {r['rss_mb']:.0f} | "
            f"{r['cgroup_peak_mb']:.0f} | {r['failcnt']} |"
        )
    return rows


def inputs_table(cases: list[Case], build: dict) -> list[str]:
    rows = [
        "| input | shape | parameters | kind | files MB | model bytes read MB | output MB "
        "(bfloat16) | build s | build peak RSS MB |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cases:
        s, b = c.inp.shape, build.get(c.inp.name, {})
        shape = (
            f"dim {s.dim}, {s.n_layers} layers, {s.n_heads}/{s.n_kv_heads} heads, "
            f"vocab {s.vocab_size}, hidden {s.hidden_dim}"
        )
        built = f"{b['seconds']:.0f} | {b['peak_rss_mb']:.0f}" if b else "- | -"
        rows.append(
            f"| {c.inp.name} | {shape} | {c.inp.params / 1e6:.0f}M | {c.inp.kind} | "
            f"{c.all_bytes / MB:.0f} | {c.model_bytes / MB:.0f} | {c.out_bytes / MB:.0f} | "
            f"{built} |"
        )
    return rows


def results_markdown(cases: list[Case], results: dict) -> str:
    info, cgroup = results["machine"], results["cgroup"]
    loads = [r["load1"] for c in cases for runs in c.runs.values() for r in runs]
    lines = [
        "# Benchmark results",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".",
        f"Load average (1 min) at the start of the timed runs: median "
        f"{statistics.median(loads):.1f}, min {min(loads):.1f}, max {max(loads):.1f} "
        f"on {info['nproc']} cores. The 1-minute average trails, and counts the benchmark's "
        "own runs (most keep two threads busy), so it reads near the core count even when "
        "nothing else runs.",
        "",
        f"Command: `{results['command']}`, on titan2tune {results['version']}.",
        "",
        "Every method runs as a subprocess of the stdlib-only launcher `benchmarks/timed.py`, "
        "which takes the wall time around it (`time.perf_counter`) and its peak RSS "
        "(`ru_maxrss`) and CPU seconds (user + system) from `os.wait4`; the launcher keeps "
        "the torch-holding benchmark process out of the child's RSS high-water mark. CPU "
        "seconds grow far less with the machine's load than wall time does. "
        "Medians over the repeats; each repeat runs every "
        "method in another order, after reading the inputs once so that the page cache is warm. "
        "Outputs are float32 -> bfloat16 for titan2tune; `dcp_to_torch` writes the whole state "
        "dict as stored (float32, and the optimizer state of the full checkpoint). "
        "The I/O floor (`benchmarks/floor.py`) reads the shard byte ranges holding the tensors "
        "titan2tune's output needs and writes as many bytes as that output with plain file "
        "calls; **ratios to the floor use the fsync variant**, since titan2tune fsyncs its "
        "output before publishing it. `+ flush s` is the `sync` after a run: what it left for "
        "the kernel to write back (dcp_to_torch does not fsync, so its wall time leaves that "
        "out; the sync is system-wide, so other work's writes land there too). "
        "MB = 10^6 bytes.",
        "",
        "## Inputs",
        "",
        "Two-rank FSDP2 DCP saves by `converter.demo.write_step` (torchtitan G4 layout, float32).",
        "",
        *inputs_table(cases, results["build"]),
        "",
    ]
    for case in cases:
        lines += [f"## {case.inp.name}", "", *results_table(case), ""]
    lines += [
        "## titan2tune's own timing split",
        "",
        "Medians of the manifest's `durations_s` (`convert` includes the output's fsync; "
        "`verify` or, with verify=false, `sha256` is the one read-back pass over the output). "
        "`outside the job` is the rest of the wall "
        "time: Python start, importing torch and Hydra, composing the config, exit. The last "
        "column sets the in-process conversion alone (streaming plus fsync) against the floor.",
        "",
        *split_table(cases),
        "",
        "## Hugging Face export",
        "",
        "`output_format=hf` (float32 -> bfloat16, one `model.safetensors` with config.json and "
        "the rest) against what a user does today, `benchmarks/hf_baseline.py`: the model's "
        "entries of the DCP loaded into a state dict, torchtitan's `to_hf`, the cast, "
        "`safetensors.torch.save_file`. Both write the same bytes (checked on every run).",
        "",
        *hf_table(cases),
        "",
        f"## In a {results['cgroup_mb']} MiB memory cgroup ({cases[0].inp.name})",
        "",
        "One run each, cgroup v1 `memory.limit_in_bytes`; the cgroup's peak counts page cache "
        "too, which the kernel reclaims under pressure.",
        "",
        *cgroup_table(cgroup),
        "",
        "## Targets",
        "",
        "Wall time <= 0.6x dcp_to_torch on the weights-only checkpoint and <= 0.35x on the full "
        "one, peak RSS <= 15% of dcp_to_torch's, wall time <= 1.5x the I/O floor, with "
        "verify=false; verify=true rows are shown alongside.",
        "",
        *targets_table(cases, cgroup),
        "",
        "![wall time and peak RSS](results.png)",
        "",
    ]
    return "\n".join(lines)


def chart(cases: list[Case], path: Path) -> None:
    """Bar charts of median wall time (outside-the-job share hatched) and peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(cases), figsize=(7 * len(cases), 8), squeeze=False)
    for col, case in enumerate(cases):
        done = [m for m in METHODS if _ok(case, m)]
        labels = [m.label for m in done]
        palette = {"ours": "C0", "dcp": "C3", "hf_baseline": "C1"}
        colors = [palette.get(m.kind, "C7") for m in done]
        walls = [_median(case, m, "wall") for m in done]
        spans = [[r["wall"] for r in _ok(case, m)] for m in done]
        err = [
            [w - min(s) for w, s in zip(walls, spans, strict=True)],
            [max(s) - w for w, s in zip(walls, spans, strict=True)],
        ]
        ax = axes[0][col]
        ax.barh(labels, walls, xerr=err, color=colors)
        outside = [_outside(case, m) if m.kind == "ours" else 0 for m in done]
        ax.barh(labels, outside, fill=False, hatch="//", edgecolor="white", linewidth=0)
        ax.set_title(f"{case.inp.name}: wall time (s), hatched: outside the job")
        failed = [m.label for m in METHODS if m not in done]
        if failed:
            ax.set_xlabel("no successful run: " + ", ".join(failed))
        ax.invert_yaxis()
        ax = axes[1][col]
        ax.barh(labels, [_median(case, m, "rss_mb") for m in done], color=colors)
        ax.set_title(f"{case.inp.name}: peak RSS (MB)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_all(args: argparse.Namespace, work: Path, logs: Path) -> dict:
    """Builds the inputs, runs every measurement and returns everything the reports need."""
    results = {
        "command": shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "version": source_version(),
        "cgroup_mb": args.cgroup_mb,
    }
    build_file = work / "build.json"
    build = json.loads(build_file.read_text()) if build_file.exists() else {}
    build.update(build_inputs(work, logs))
    build_file.write_text(json.dumps(build, indent=2))
    cases = []
    for inp in INPUTS:
        print(f"{inp.name}: probe conversion, then {args.repeats} repeats", flush=True)
        cases.append(prepare(inp, work, logs))
        benchmark(cases[-1], args.repeats, logs)
    results["cgroup"] = {
        m.label: in_cgroup(m, cases[0], args.cgroup_mb << 20, logs) for m in CGROUP_METHODS
    }
    print("profiling one conversion with py-spy", flush=True)
    results["profile"] = profile(cases[0], work, logs)
    shutil.rmtree(work / "out" / "hydra", ignore_errors=True)
    results["cases"] = {
        c.inp.name: {k: getattr(c, k) for k in ("model_bytes", "all_bytes", "out_bytes", "runs")}
        for c in cases
    }
    return results | {"build": build, "machine": machine()}


def write_reports(results: dict, work: Path) -> str:
    """RESULTS.md, results.png and PROFILE.md from a run's results; returns RESULTS.md."""
    cases = [
        Case(
            inp,
            input_step_dir(work, inp),
            work / "out",
            work / f"{inp.name}-floor.json",
            **results["cases"][inp.name],
        )
        for inp in INPUTS
    ]
    report = results_markdown(cases, results)
    (HERE / "RESULTS.md").write_text(report)
    chart(cases, HERE / "results.png")
    (HERE / "PROFILE.md").write_text(profile_markdown(results["profile"], cases[0]))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work", help="inputs and outputs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cgroup-mb", type=int, default=512, help="memory cgroup limit")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the reports from the last run"
    )
    parser.add_argument(
        "--build-input", choices=[i.name for i in INPUTS], help="internal: build one input"
    )
    args = parser.parse_args()
    work = args.work.resolve()
    if args.build_input:
        build_input(work, args.build_input)
        return
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        results = run_all(args, work, logs)
        (work / "results.json").write_text(json.dumps(results, indent=2))
    print(write_reports(json.loads((work / "results.json").read_text()), work))


if __name__ == "__main__":
    main()
