"""Benchmark a conversion from object storage against downloading the step folder first.

    python -m benchmarks.remote --size 2.6GB --repeats 3      # the 2.6 GB checkpoint
    python -m benchmarks.remote --size small --repeats 1      # ~190 MB, to try it out
    python -m benchmarks.remote --kinds weights_only           # one of the two checkpoints

Serves real two-rank FSDP2 DCP saves (``demo.writer``: a float32 weights-only save, and a full
training save with its AdamW state) from a local S3 server (moto's ``moto_server``, as the
tests start it), optionally behind the tests' proxy adding latency per request (``--delay-ms``),
and times, in another order every repeat, each as a child of ``timed.py`` (wall, CPU, peak RSS):

* ``titan2tune from s3``: ``convert.py`` with ``experiment.checkpoint_dir=s3://...``;
* ``s3fs get + local``: ``s3fs.S3FileSystem.get`` of the whole step folder to a local disk,
  then ``convert.py`` on the copy (the two timed apart, and summed).

Both outputs must have the same sha256, or the benchmark stops. Writes the raw runs to
``<work>/remote_results.json`` and a Markdown report to ``<work>/REMOTE.md``.

moto is a test server: it reads a whole object for every ranged GET (the report gives the
cost it measured), which a real object store does not; at its 2.6 GB size this favours the
whole-object download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from demo import writer as demo
from tests.fault_proxy import FaultProxy
from tests.s3_server import S3_ENV, client, moto_server, upload_folder

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUCKET = "bench"
SHAPES = {
    # ~650M parameters: float32 weights-only 2.6 GB, as benchmarks/run.py's main input.
    "2.6GB": demo.ModelShape(
        dim=2048, n_layers=11, n_heads=16, n_kv_heads=8, vocab_size=32000, hidden_dim=5632
    ),
    # ~47M parameters: 190 MB weights-only, 570 MB with the optimizer state.
    "small": demo.ModelShape(
        dim=512, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=32000, hidden_dim=1408
    ),
}
KINDS = {"weights_only": 1000, "full": 2}  # kind -> step


@dataclass(frozen=True)
class Case:
    kind: str
    step_dir: Path

    @property
    def prefix(self) -> str:
        return f"{self.kind}/checkpoint"

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.step_dir.iterdir())


def build(work: Path, size: str, kinds: list[str]) -> list[Case]:
    """Each kind's step folder, written unless complete."""
    shape = SHAPES[size]
    cases = []
    for kind in kinds:
        step = KINDS[kind]
        step_dir = work / size / kind / "checkpoint" / f"step-{step}"
        if not (step_dir / ".metadata").is_file():
            print(f"building {size} {kind} in {step_dir}", flush=True)
            demo.write_step(
                step_dir,
                demo.reference_weights(shape, seed=7),
                shape,
                layout=demo.TORCHTITAN_0_3,
                kind=kind,
                export_dtype=torch.float32,
            )
        cases.append(Case(kind, step_dir))
    return cases


def timed(argv: list[str], log: Path, env: dict[str, str]) -> dict:
    launcher = [sys.executable, str(HERE / "timed.py"), "--log", str(log), "--"]
    done = subprocess.run([*launcher, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"timed.py failed: {done.stderr}")
    record = json.loads(done.stdout)
    if record["code"]:
        raise RuntimeError(f"{argv[:4]}... exited {record['code']}; see {log}")
    return record


def convert_argv(source: str, out: Path, size: str, workers: int, verify: bool) -> list[str]:
    s = SHAPES[size]
    return [
        sys.executable,
        "convert.py",
        "experiment=debug",
        f"experiment.checkpoint_dir={source}",
        f"experiment.output={out}",
        f"hydra.run.dir={out.parent / 'hydra' / out.stem}",
        "experiment.export_dtype=bfloat16",
        f"experiment.model.n_heads={s.n_heads}",
        f"experiment.model.n_kv_heads={s.n_kv_heads}",
        f"experiment.model.n_layers={s.n_layers}",
        f"experiment.model.dim={s.dim}",
        f"experiment.model.vocab_size={s.vocab_size}",
        f"experiment.model.hidden_dim={s.hidden_dim}",
        f"workers={workers}",
        f"verify={str(verify).lower()}",
        "overwrite=true",
    ]


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def clear(out: Path) -> None:
    for path in out.parent.glob(out.name + "*"):
        path.unlink()


def remote(case: Case, args: argparse.Namespace, env: dict, out_dir: Path, logs: Path) -> dict:
    out = out_dir / f"{case.kind}-remote.pt"
    clear(out)
    url = f"s3://{BUCKET}/{case.prefix}"
    argv = convert_argv(url, out, args.size, args.workers_remote, args.verify)
    record = timed(argv, logs / f"{case.kind}-remote.log", env)
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    record["downloaded"] = manifest["source"]["storage"]["bytes_downloaded"]
    record["requests"] = manifest["source"]["storage"]["requests"]
    record["sha256"] = sha256(out)
    clear(out)
    return record


def download_then_local(
    case: Case, args: argparse.Namespace, env: dict, out_dir: Path, logs: Path
) -> dict:
    local = out_dir / f"{case.kind}-download" / "checkpoint"
    shutil.rmtree(local.parent, ignore_errors=True)
    step = case.step_dir.name
    get = (
        "import sys, s3fs\n"
        "fs = s3fs.S3FileSystem(skip_instance_cache=True)\n"
        "fs.get(sys.argv[1], sys.argv[2], recursive=True)\n"
    )
    target = local / step
    target.mkdir(parents=True)
    fetched = timed(
        [sys.executable, "-c", get, f"{BUCKET}/{case.prefix}/{step}/", f"{target}/"],
        logs / f"{case.kind}-get.log",
        env,
    )
    os.sync()
    out = out_dir / f"{case.kind}-local.pt"
    clear(out)
    argv = convert_argv(str(local), out, args.size, args.workers_local, args.verify)
    converted = timed(argv, logs / f"{case.kind}-local.log", env)
    record = {
        "wall": fetched["wall"] + converted["wall"],
        "cpu": fetched["cpu"] + converted["cpu"],
        "rss_mb": max(fetched["rss_mb"], converted["rss_mb"]),
        "get_wall": fetched["wall"],
        "convert_wall": converted["wall"],
        "downloaded": sum(p.stat().st_size for p in target.iterdir()),
        "disk_bytes": sum(p.stat().st_size for p in target.iterdir()),
        "sha256": sha256(out),
    }
    clear(out)
    shutil.rmtree(local.parent)
    return record


def ranged_get_cost(endpoint: str, case: Case) -> float:
    """Seconds moto takes for a 4 KiB ranged GET of the case's largest shard object."""
    largest = max(case.step_dir.iterdir(), key=lambda p: p.stat().st_size)
    s3 = client(endpoint)
    key = f"{case.prefix}/{case.step_dir.name}/{largest.name}"
    start = time.perf_counter()
    for _ in range(5):
        s3.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-4095")["Body"].read()
    return (time.perf_counter() - start) / 5


def report(results: dict) -> str:
    lines = [
        "# Conversion from object storage vs download, then local conversion",
        "",
        f"{results['machine']}; checkpoints `{results['size']}`, served by moto_server "
        f"{results['moto']}{results['latency']}; `workers={results['workers_remote']}` from "
        f"the store, `workers={results['workers_local']}` locally, `verify="
        f"{str(results['verify']).lower()}`, float32 -> bfloat16; medians of "
        f"{results['repeats']} runs.",
        "",
        "| checkpoint | size | method | wall s | CPU s | peak RSS MB | downloaded MB | "
        "requests | local disk MB | server CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, case in results["cases"].items():
        for label, runs in case["runs"].items():

            def med(key: str, runs: list[dict] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            wall = f"{med('wall'):.1f}"
            if "get_wall" in runs[0]:
                wall += f" ({med('get_wall'):.1f} + {med('convert_wall'):.1f})"
            lines.append(
                f"| {kind} | {case['bytes'] / 1e6:.0f} MB | {label} | {wall} | "
                f"{med('cpu'):.1f} | {med('rss_mb'):.0f} | {med('downloaded') / 1e6:.0f} | "
                f"{runs[0].get('requests', '-')} | {runs[0].get('disk_bytes', 0) / 1e6:.0f} | "
                f"{med('server_cpu'):.1f} |"
            )
    lines += [
        "",
        "CPU s: the method's own processes; server CPU s: moto_server's during the method. "
        "moto reads a whole object for every ranged GET: a 4 KiB ranged GET of the largest "
        f"shard object took {results['ranged_get_s'] * 1e3:.0f} ms here. A real store serves a "
        "range in time of its own size; the conversion from the store, which sends one ranged "
        "GET per part, per chunk read and per batch of chunk layouts, pays moto's cost on "
        "each (its server CPU), the whole-object download once per object.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work" / "remote")
    parser.add_argument("--size", choices=list(SHAPES), default="2.6GB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="latency added per request")
    parser.add_argument("--workers-remote", type=int, default=4)
    parser.add_argument("--workers-local", type=int, default=2)
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    args = parser.parse_args()
    work = args.work.resolve()
    logs, out_dir = work / "logs", work / "out"
    logs.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = build(work / "inputs", args.size, args.kinds)
    methods = {"titan2tune from s3": remote, "s3fs get + local": download_then_local}
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "size": args.size,
        "repeats": args.repeats,
        "verify": args.verify,
        "workers_remote": args.workers_remote,
        "workers_local": args.workers_local,
        "latency": f", {args.delay_ms:.0f} ms added per request" if args.delay_ms else "",
        "cases": {},
    }
    from importlib.metadata import version

    results["moto"] = version("moto")
    with moto_server() as server, FaultProxy(server.endpoint, args.delay_ms / 1e3) as proxy:
        endpoint = server.endpoint
        env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": proxy.url}
        for case in cases:
            upload_folder(endpoint, case.step_dir.parent, BUCKET, case.prefix)
        results["ranged_get_s"] = ranged_get_cost(endpoint, cases[0])
        for case in cases:
            runs: dict[str, list[dict]] = {label: [] for label in methods}
            for r in range(args.repeats):
                order = list(methods) if r % 2 == 0 else list(reversed(methods))
                for label in order:
                    served = server.cpu_seconds()
                    record = methods[label](case, args, env, out_dir, logs)
                    record["server_cpu"] = server.cpu_seconds() - served
                    runs[label].append(record)
                    print(f"{case.kind} {label}: {record['wall']:.1f} s", flush=True)
            digests = {r["sha256"] for rs in runs.values() for r in rs}
            if len(digests) != 1:
                raise RuntimeError(f"{case.kind}: the methods wrote different outputs {digests}")
            results["cases"][case.kind] = {"bytes": case.bytes, "runs": runs}
    (work / "remote_results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (work / "REMOTE.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
