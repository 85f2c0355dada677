"""Sweeps on a real SLURM cluster, launched as users launch them: ``python convert.py -m
experiment=... hydra/launcher=slurm`` from a working folder, with the jobs run by slurmd.

The cluster is the one-node cluster of ``launch/slurm_cluster.sh up`` (``make test`` starts it).
Without it these tests fail in CI (CI=true) and are skipped elsewhere. The checkpoints are real
two-rank DCP saves (``converter.demo``); no part of SLURM, submitit or Hydra is mocked.

Every sweep runs under a timeout: the test cluster has no accounting, so submitit cannot tell
that a job ended without a result file and would wait for it forever. A sweep that times out
has its SLURM jobs cancelled before the test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from converter.sources.dcp import DcpIndex
from converter.sources.storage import LocalStorage
from converter.tasks import TaskGroup
from demo import experiments
from tests.conftest import REPO, demo_workdir, latest_step, unavailable
from tests.test_faults import overwrite_tensor_bytes

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

CLUSTER = REPO / "launch" / "slurm_cluster.sh"
EXPERIMENTS = ("debug", "500M", "debug_pretrained")
SWEEP_TIMEOUT_S = 300  # one sweep: job start-up and conversion, even with the node busy
REQUEUE_TIMEOUT_S = 420  # ... plus a requeue (cred_expire=30 s before it may start again)
SWEEP_DIR = "hydra.sweep.dir="
ARTIFACTS = {"final_model.pt", "final_model.pt.manifest.json", "final_model.pt.torchtune.yaml"}


# ------------------------------------------------------------------------------------ helpers


def slurm_cmd(*args: str, check: bool = True) -> str:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=60, check=check
    ).stdout.strip()


def submitted_jobs(folder: Path) -> list[str]:
    """SLURM job ids of every sweep launched below ``folder``, from submitit's job folders
    (``.submitit/<id>`` for a one-job sweep, ``.submitit/<array id>_<index>`` per element of
    an array; the array's own folder holds only its sbatch script)."""
    return sorted(
        d.parent.name for sub in folder.rglob(".submitit") for d in sub.glob("*/*_submitted.pkl")
    )


def cancel_jobs(folder: Path) -> None:
    """Cancels the jobs of the sweeps below ``folder`` (ours only: the cluster is shared)."""
    ids = {d.name.split("_")[0] for sub in folder.rglob(".submitit") for d in sub.iterdir()}
    if ids:
        slurm_cmd("scancel", *sorted(ids), check=False)


def job_state(job: str) -> str:
    """RUNNING, PENDING, COMPLETED, FAILED, ...; "" once SLURM has forgotten the job."""
    out = slurm_cmd("squeue", "-h", "-t", "all", "-j", job, "-o", "%T", check=False)
    return out.splitlines()[0] if out else ""


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float, on_timeout: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            cancel_jobs(on_timeout)
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def sweep(cwd: Path, *overrides: str, timeout: float = SWEEP_TIMEOUT_S) -> tuple[int, str]:
    """Runs a sweep on SLURM to its end; returns (exit code, stdout + stderr)."""
    try:
        run = subprocess.run(
            [sys.executable, str(REPO / "convert.py"), "-m", *overrides, "hydra/launcher=slurm"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        elsewhere = [o.removeprefix(SWEEP_DIR) for o in overrides if o.startswith(SWEEP_DIR)]
        for folder in (cwd, *elsewhere):
            cancel_jobs(cwd / folder)
        pytest.fail(
            f"sweep {overrides} did not finish in {timeout} s (jobs cancelled); queue:\n"
            f"{slurm_cmd('squeue', check=False)}\nlauncher stderr:\n{_text(e.stderr)[-3000:]}"
        )
    return run.returncode, run.stdout + run.stderr


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


class BackgroundSweep:
    """A sweep left running while the test acts on its SLURM job."""

    def __init__(self, cwd: Path, sweep_dir: Path, *overrides: str) -> None:
        self.cwd, self.sweep_dir = cwd, sweep_dir
        sweep_dir.mkdir(parents=True)
        self.log = sweep_dir.parent / f"{sweep_dir.name}.launcher.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "convert.py"),
                    "-m",
                    *overrides,
                    "hydra/launcher=slurm",
                    f"{SWEEP_DIR}{sweep_dir}",
                ],
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def job(self) -> str:
        """The id of this one-experiment sweep's SLURM job, once submitted."""
        wait_for(
            "the sweep's submission", lambda: submitted_jobs(self.sweep_dir), 60, self.sweep_dir
        )
        (job,) = submitted_jobs(self.sweep_dir)
        return job

    def job_log(self, job: str) -> Path:
        """The job's stderr: its log lines and progress bar, from every run of it."""
        return self.sweep_dir / ".submitit" / job / f"{job}_0_log.err"

    def wait_running(self, what: str, ready: Callable[[str], bool]) -> str:
        """Waits until the job is RUNNING and ``ready(job)``; returns the job id."""
        job = self.job()
        wait_for(
            f"job {job} {what}",
            lambda: job_state(job) == "RUNNING" and ready(job),
            SWEEP_TIMEOUT_S,
            self.sweep_dir,
        )
        return job

    def wait_streaming(self, name: str) -> str:
        """Waits until the job's progress bar shows tensors of ``name`` written: the conversion
        is past its set-up (submitit's signal handlers are installed, the output's structure is
        written) and streams data into the partial file. Returns the job id."""
        progress = re.compile(rf"{re.escape(name)}: +[1-9]\d*%\|")

        def streaming(job: str) -> bool:
            log = self.job_log(job)
            return log.exists() and progress.search(log.read_text(errors="replace")) is not None

        return self.wait_running("to stream tensors", streaming)

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"sweep did not finish in {timeout} s; launcher log:\n{self.output()}")
        return code, self.output()

    def stop(self) -> None:
        """Ends the launching process, if still running, and cancels its jobs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        cancel_jobs(self.sweep_dir)

    def output(self) -> str:
        return self.log.read_text()


def summary_rows(output: str) -> dict[str, str]:
    """experiment -> status, from the end-of-sweep table."""
    rows = re.findall(r"^(\S+) +(converted|skipped|failed) +", output, flags=re.M)
    return dict(rows)


def sweep_dir_of(cwd: Path, output: str) -> Path:
    """The sweep folder the launcher reported (Hydra's default: outputs/sweeps/<time>)."""
    found = re.search(r"the sweep's folder: (\S+)$", output, flags=re.M)
    assert found, output[-3000:]
    return cwd / found.group(1)


def manifest_of(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".manifest.json").read_text())


def assert_output_equals(out: Path, saved: dict[str, torch.Tensor], export: torch.dtype) -> None:
    """The output holds exactly the saved weights (Meta keys), cast to the export dtype."""
    tensors = torch.load(out, mmap=True, weights_only=True)
    assert sorted(tensors) == sorted(saved), out
    for key, value in saved.items():
        assert tensors[key].dtype == export, key
        assert torch.equal(tensors[key], value.to(export)), key


def export_dtype(name: str) -> torch.dtype:
    return experiments.DEMO_EXPERIMENTS[name][2][-1][
        2
    ]  # the weights-only save's dtype is the export's


def latest(saved: dict, name: str) -> dict[str, torch.Tensor]:
    return saved[name][max(saved[name])]


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """The local cluster must be up: a hard failure in CI, where `make test` starts it."""
    try:
        status = subprocess.run(
            ["bash", str(CLUSTER), "status"], capture_output=True, text=True, timeout=60
        )
        healthy, report = status.returncode == 0, status.stdout + status.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        healthy, report = False, str(e)
    if not healthy:
        message = (
            f"no healthy SLURM cluster ({CLUSTER.relative_to(REPO)} status failed); start it "
            f"with `bash {CLUSTER.relative_to(REPO)} up` (as root).\n{report}"
        )
        unavailable(message)


@pytest.fixture(scope="module")
def demo_root(slurm_cluster, demo_checkpoints, tmp_path_factory):
    """A working folder laid out as `make demo` leaves it (outputs/checkpoint_<name>/step-<N>),
    on the session's demo checkpoints, and the weights each save holds: `step=latest`
    converts the weights-only saves."""
    root = demo_workdir(demo_checkpoints, tmp_path_factory.mktemp("slurm_demo"))
    yield root, demo_checkpoints[1]
    cancel_jobs(root)


# -------------------------------------------------------------------------------------- tests


def test_profiles_resolve_from_any_directory(tmp_path, monkeypatch):
    """hydra/launcher=slurm and =slurm_gpu compose outside the repo, with the requests and the
    setup lines the docs state, and their fields (sbatch options included) can be overridden.
    No cluster needed."""
    monkeypatch.chdir(tmp_path)

    def launcher(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("convert", ["experiment=debug", *overrides], return_hydra_config=True)
        return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)

    def setup(cpus: int) -> list[str]:
        return [
            f"export OMP_NUM_THREADS={cpus}",
            f"export MKL_NUM_THREADS={cpus}",
            "export SLURM_KILL_BAD_EXIT=1",
        ]

    cpu, gpu = launcher("hydra/launcher=slurm"), launcher("hydra/launcher=slurm_gpu")
    for profile in (cpu, gpu):
        assert profile["_target_"].endswith("SlurmLauncher")
        assert (profile["nodes"], profile["tasks_per_node"]) == (1, 1)
        assert (profile["partition"], profile["account"], profile["qos"]) == (None, None, None)
        assert (profile["signal_delay_s"], profile["max_num_timeout"]) == (120, 0)
        assert profile["additional_parameters"] == {"requeue": True}
        assert profile["submitit_folder"].endswith("/.submitit/%j")
    assert cpu["gpus_per_node"] is None and cpu["gres"] is None  # no GPU unless asked for
    assert (cpu["cpus_per_task"], cpu["mem_gb"], cpu["timeout_min"]) == (2, 4, 60)
    assert cpu["array_parallelism"] == 16 and cpu["setup"] == setup(2)
    assert (gpu["gpus_per_node"], gpu["gres"]) == (1, None)
    assert (gpu["cpus_per_task"], gpu["mem_gb"], gpu["timeout_min"]) == (8, 64, 120)
    assert gpu["array_parallelism"] == 8 and gpu["setup"] == setup(8)

    changed = launcher(
        "hydra/launcher=slurm_gpu",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=proj",
        "hydra.launcher.qos=high",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.cpus_per_task=4",
        "hydra.launcher.array_parallelism=2",
        "+hydra.launcher.additional_parameters.mail-type=END",
    )
    assert (changed["partition"], changed["account"], changed["qos"]) == ("gpu", "proj", "high")
    assert (changed["timeout_min"], changed["array_parallelism"]) == (30, 2)
    assert changed["additional_parameters"] == {"requeue": True, "mail-type": "END"}
    assert changed["setup"] == setup(4)  # the thread counts follow cpus_per_task


def test_three_experiments_on_slurm(demo_root):
    """The README command, run on SLURM: every experiment is converted by its own SLURM job
    (recorded in its manifest), every output holds exactly the saved weights, and the
    end-of-sweep summary lists all three."""
    root, saved = demo_root
    code, output = sweep(root, "experiment=" + ",".join(EXPERIMENTS))
    assert code == 0, output[-5000:]
    assert summary_rows(output) == dict.fromkeys(EXPERIMENTS, "converted"), output[-3000:]

    sweep_dir = sweep_dir_of(root, output)
    assert sweep_dir.parent == root / "outputs" / "sweeps"
    jobs = submitted_jobs(sweep_dir)
    # One array of three elements: <array id>_<index>.
    assert len(jobs) == 3 and len({j.split("_")[0] for j in jobs}) == 1, jobs
    ran_in = set()
    for name in EXPERIMENTS:
        out = root / "outputs" / f"checkpoint_{name}" / "final_model.pt"
        assert_output_equals(out, latest(saved, name), export_dtype(name))
        slurm = manifest_of(out)["slurm"]
        assert slurm["job_id"] in jobs and slurm["hostname"], slurm
        assert Path(slurm["stderr"]).parent == sweep_dir / ".submitit" / slurm["job_id"]
        assert f"{name}: wrote " in Path(slurm["stderr"]).read_text()
        ran_in.add(slurm["job_id"])
        # Each element of the array renamed itself for its experiment (slurmctld keeps a
        # finished job's record for MinJobAge, 300 s by default).
        shown = slurm_cmd("scontrol", "show", "job", slurm["job_id"])
        assert f"JobName=titan2tune:{name}" in shown, shown
    assert len(ran_in) == 3  # three jobs, not one job converting three experiments
    # Without accounting, submitit's sacct warning is printed for its first poll only (its own
    # handler and Hydra's each print that record), not for every poll.
    polls = set(re.findall(r"Call #(\d+) - Bypassing sacct error", output))
    assert polls <= {"1"}, output[-3000:]

    # What the profile asked SLURM for (sbatch script written by submitit).
    (script,) = sweep_dir.glob(".submitit/*/*_submission.sh")
    sbatch = set(re.findall(r"^#SBATCH (\S+)", script.read_text(), flags=re.M))
    assert {"--cpus-per-task=2", "--mem=4GB", "--time=60", "--requeue"} <= sbatch, sbatch
    assert "--signal=USR2@120" in sbatch, sbatch
    # All three at once: submitit caps the profile's array_parallelism (16) at the job count.
    assert "--array=0-2%3" in sbatch, sbatch
    assert not any(opt.startswith(("--gpus", "--gres")) for opt in sbatch), sbatch


def test_broken_checkpoint_fails_only_its_job(demo_root, tmp_path):
    """One experiment's shard is truncated: its job fails with an error naming the shard, the
    other job converts, the summary shows both and where the failed job ran and logged, and the
    sweep exits non-zero."""
    root, saved = demo_root
    for name in ("debug", "debug_pretrained"):  # the step folders, not earlier outputs
        step = latest_step(root / "outputs" / f"checkpoint_{name}")
        shutil.copytree(step, tmp_path / "outputs" / f"checkpoint_{name}" / step.name)
    (step,) = (tmp_path / "outputs" / "checkpoint_debug_pretrained").glob("step-*")
    shard = step / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)

    code, output = sweep(tmp_path, "experiment=debug,debug_pretrained")
    assert code != 0, output[-5000:]
    assert summary_rows(output) == {"debug": "converted", "debug_pretrained": "failed"}, output

    failure = re.search(
        r"^debug_pretrained \(job 1\) failed \(SLURM job (\S+), log (\S+)\):\n +(.+)$",
        output,
        flags=re.M,
    )
    assert failure, output[-3000:]
    job, log, error = failure.groups()
    sweep_dir = sweep_dir_of(tmp_path, output)
    assert job in submitted_jobs(sweep_dir)
    assert Path(log).parent == sweep_dir / ".submitit" / job
    assert f"Shard file {shard} is truncated" in error
    assert f"Shard file {shard} is truncated" in Path(log).read_text()

    good = tmp_path / "outputs" / "checkpoint_debug" / "final_model.pt"
    assert_output_equals(good, latest(saved, "debug"), export_dtype("debug"))
    # The failed job wrote nothing beside its (damaged) source.
    broken = tmp_path / "outputs" / "checkpoint_debug_pretrained"
    assert sorted(p.name for p in broken.iterdir()) == [step.name]


def test_a_job_that_dies_outside_the_conversion_is_reported_with_the_others(demo_root, tmp_path):
    """Job 0's Python cannot start on its node (its address space is capped below what torch
    maps): the sweep waits for job 1, which converts, prints the summary, and fails naming job
    0, its SLURM state and its log. (hydra-submitit-launcher raised at job 0: a traceback, no
    summary, and job 1 still running.)"""
    root, saved = demo_root
    for name in ("debug", "debug_pretrained"):
        step = latest_step(root / "outputs" / f"checkpoint_{name}")
        shutil.copytree(step, tmp_path / "outputs" / f"checkpoint_{name}" / step.name)
    code, output = sweep(
        tmp_path,
        "experiment=debug,debug_pretrained",
        'hydra.launcher.setup=["test $SLURM_ARRAY_TASK_ID = 1 || ulimit -v 400000"]',
    )
    assert code == 1, output[-5000:]
    assert summary_rows(output) == {"debug_pretrained": "converted"}, output[-5000:]
    said = re.search(
        r"Job 0 \(experiment=debug\) ended without a result: SLURM job (\S+), state \S+; "
        r"ImportError: .+ Its log: (\S+)\. ",
        output,
    )
    assert said, output[-5000:]
    job, log = said.groups()
    sweep_dir = sweep_dir_of(tmp_path, output)
    assert job in submitted_jobs(sweep_dir) and Path(log) == sweep_dir / ".submitit" / job / (
        f"{job}_0_log.err"
    )
    assert "1 of the sweep's 2 jobs reported no result (job 0: experiment=debug)" in output
    assert "Traceback" not in output
    good = tmp_path / "outputs" / "checkpoint_debug_pretrained" / "final_model.pt"
    assert_output_equals(good, latest(saved, "debug_pretrained"), export_dtype("debug_pretrained"))
    assert not (tmp_path / "outputs" / "checkpoint_debug" / "final_model.pt").exists()


def test_killed_then_preempted_conversion_finishes_when_resubmitted(demo_root, tmp_path):
    """The 500M conversion (1 GB, several seconds) is
    1. SIGKILLed mid-write: it leaves a partial file, never an output;
    2. resubmitted, then preempted (USR2, as `scancel --signal=USR2` or a preempting scheduler
       sends it): submitit checkpoints the launcher, the job requeues itself, runs the Hydra job
       again from the start and writes a correct output; nothing partial is left;
    3. resubmitted once more: the complete output is skipped."""
    root, saved = demo_root
    out = tmp_path / "preempt" / "final_model.pt"
    partial = out.with_name(f".{out.name}.partial")
    # One worker and a sha256 pass keep the job converting for seconds after its tensors begin
    # to stream, longer than the preemption signal takes to arrive (two workers take ~1 s).
    overrides = ("experiment=500M", f"experiment.output={out}", "workers=1", "sha256=true")

    # 1. Killed: SIGKILL to the job step's task, as the out-of-memory killer sends it, so no
    # handler runs and nothing is cleaned up. (`scancel <job>` would send SIGTERM first, which
    # submitit ignores, and SIGKILL only KillWait later: the conversion might finish meanwhile.)
    killed = BackgroundSweep(root, tmp_path / "sweep_killed", *overrides)
    try:
        job = killed.wait_running(f"to write {partial}", lambda job: partial.exists())
        slurm_cmd("scancel", "--signal=KILL", f"{job}.0")
        wait_for(
            f"job {job} to end",
            lambda: job_state(job) not in ("RUNNING", "COMPLETING"),
            60,
            tmp_path,
        )
    finally:
        # Without accounting the launcher would wait for this job's result forever.
        killed.stop()
    assert partial.exists() and not out.exists()

    # 2. Resubmitted, then preempted while it converts.
    preempted = BackgroundSweep(root, tmp_path / "sweep_preempted", *overrides)
    try:
        # While tensors stream: the bulk of a conversion, so where a preemption mostly lands.
        job = preempted.wait_streaming("500M")
        slurm_cmd("scancel", "--signal=USR2", job)
        code, output = preempted.finish(REQUEUE_TIMEOUT_S)
    finally:
        preempted.stop()
    assert code == 0, output[-5000:]
    assert summary_rows(output) == {"500M": "converted"}, output[-3000:]
    assert "Restarts=1" in slurm_cmd("scontrol", "show", "job", "-o", job)  # requeued by SLURM
    job_log = preempted.job_log(job).read_text(errors="replace")
    assert "this job is preempted" in job_log and f"Requeued job {job}" in job_log, job_log
    assert job_log.count("500M: step-2000 of") == 2, job_log  # started, then started again
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(ARTIFACTS)
    assert manifest_of(out)["slurm"]["job_id"] == job
    assert_output_equals(out, latest(saved, "500M"), export_dtype("500M"))

    # 3. Resubmitted after completion: nothing to do.
    before = out.stat().st_mtime_ns
    code, output = sweep(root, *overrides, f"{SWEEP_DIR}{tmp_path}/sweep_resubmitted")
    assert code == 0, output[-5000:]
    assert summary_rows(output) == {"500M": "skipped"}, output[-3000:]
    assert out.stat().st_mtime_ns == before


def test_one_conversion_shared_by_two_tasks(demo_root, tmp_path):
    """`hydra.launcher.tasks_per_node=2`: both tasks of one SLURM job fill disjoint tensors of
    the one output file; task 0 verifies and publishes it. The output is exact, every byte was
    written by one of them (verify checks each region's digest and that the regions tile each
    tensor once), each task wrote a share, and the manifest has the digest of every source
    tensor, from both tasks."""
    root, saved = demo_root
    out = tmp_path / "shared" / "final_model.pt"
    code, output = sweep(
        root,
        "experiment=500M",
        f"experiment.output={out}",
        "hydra.launcher.tasks_per_node=2",
        # One CPU a task, as the one-node test cluster has two: with the profile's two, the
        # job would wait for a node it cannot get.
        "hydra.launcher.cpus_per_task=1",
        f"{SWEEP_DIR}{tmp_path}/sweep",
    )
    assert code == 0, output[-5000:]
    assert summary_rows(output) == {"500M": "converted"}, output[-3000:]
    assert_output_equals(out, latest(saved, "500M"), export_dtype("500M"))
    manifest = manifest_of(out)
    assert manifest["slurm"]["tasks"] == 2 and manifest["slurm"]["task"] == 0
    job = manifest["slurm"]["job_id"]
    logs = tmp_path / "sweep" / ".submitit" / job
    lead_log = (logs / f"{job}_0_log.err").read_text()
    other_log = (logs / f"{job}_1_log.err").read_text()
    assert "filled by 2 tasks" in lead_log, lead_log[-3000:]
    filled = re.search(r"500M: task 1 of 2 filled ([\d.]+) MB of ", other_log)
    assert filled, other_log[-3000:]
    assert 0.2 < float(filled.group(1)) * 1e6 / manifest["output"]["bytes"] < 0.8
    step_dir = latest_step(root / "outputs" / "checkpoint_500M")
    index = DcpIndex(LocalStorage(str(step_dir.parent)), str(step_dir))
    assert set(manifest["source"]["tensors"]) == set(index.tensors)
    for name, entry in manifest["source"]["files"].items():
        assert entry["bytes"] == (step_dir / name).stat().st_size, name
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(ARTIFACTS)
    assert not list((tmp_path / "sweep").glob("titan2tune_tasks/*")), "task messages were left"


def _task_pid(job: str, rank: int) -> int | None:
    """The process of task ``rank`` of SLURM job ``job`` that runs the Hydra job."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(
                item.split("=", 1)
                for item in (proc / "environ").read_text(errors="replace").split("\0")
                if "=" in item
            )
            cmdline = (proc / "cmdline").read_text(errors="replace")
        except (OSError, ValueError):
            continue
        if (
            env.get("SLURM_JOB_ID") == job
            and env.get("SLURM_PROCID") == str(rank)
            and "submitit.core._submit" in cmdline
        ):
            return int(proc.name)
    return None


def test_a_task_that_dies_ends_its_job(demo_root, tmp_path):
    """SIGKILL to task 1 as soon as it starts, long before it could answer task 0: the
    profile's SLURM_KILL_BAD_EXIT=1 makes srun end task 0 too, which would otherwise wait for
    task 1's answer until the time limit. The job ends and no output is published.

    The launching process is stopped by the test: a job that dies without a result is not
    reported by hydra-submitit-launcher on a cluster without accounting (it polls sacct)."""
    root, _ = demo_root
    out = tmp_path / "out" / "final_model.pt"
    run = BackgroundSweep(
        root,
        tmp_path / "sweep",
        "experiment=500M",
        f"experiment.output={out}",
        "hydra.launcher.tasks_per_node=2",
        # One CPU a task, as the one-node test cluster has two: with the profile's two, the
        # job would wait for a node it cannot get.
        "hydra.launcher.cpus_per_task=1",
    )
    try:
        job = run.job()
        pids: list[int] = []
        wait_for(
            "task 1's process",
            lambda: pids.append(_task_pid(job, 1) or 0) or pids[-1],
            SWEEP_TIMEOUT_S,
            run.sweep_dir,
        )
        os.kill(pids[-1], signal.SIGKILL)
        wait_for(
            f"job {job} to end",
            lambda: job_state(job) not in ("PENDING", "RUNNING", "COMPLETING"),
            SWEEP_TIMEOUT_S,
            run.sweep_dir,
        )
    finally:
        run.stop()
    srun = run.job_log(job).read_text(errors="replace")
    assert "task 1: Killed" in srun and "task 0: Terminated" in srun, srun[-3000:]
    assert _task_pid(job, 0) is None
    assert not out.exists()


@pytest.mark.parametrize("allowed", [False, True], ids=["refused", "allow_nonfinite"])
def test_nan_in_a_tasks_share(demo_root, tmp_path, allowed):
    """A tensor of task 1's share holds NaN. Refused: task 1 fails its share, task 0 fails the
    job with task 1's error, and nothing is left: no output, no partial file, no messages.
    With allow_nonfinite=true: the NaN task 1 wrote are counted in the manifest that task 0
    writes for the whole output."""
    root, _ = demo_root
    pristine = latest_step(root / "outputs" / "checkpoint_debug")
    step_dir = tmp_path / "checkpoint" / pristine.name
    shutil.copytree(pristine, step_dir)
    index = DcpIndex(LocalStorage(str(step_dir.parent)), str(step_dir))
    sizes = {k: e.nbytes for k, e in index.tensors.items() if k.endswith(".weight")}
    victim = TaskGroup(rank=1, count=2).share_of(sizes)[0]
    overwrite_tensor_bytes(step_dir, victim, b"\xff" * 64)
    out = tmp_path / "out" / "final_model.pt"

    code, output = sweep(
        root,
        "experiment=debug",
        f"experiment.checkpoint_dir={step_dir.parent}",
        f"experiment.output={out}",
        f"allow_nonfinite={str(allowed).lower()}",
        "hydra.launcher.tasks_per_node=2",
        # One CPU a task, as the one-node test cluster has two: with the profile's two, the
        # job would wait for a node it cannot get.
        "hydra.launcher.cpus_per_task=1",
        f"{SWEEP_DIR}{tmp_path}/sweep",
    )
    assert not list((tmp_path / "sweep").glob("titan2tune_tasks/*")), "task messages were left"
    if allowed:
        assert code == 0, output[-5000:]
        manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
        [(name, count)] = manifest["nonfinite"].items()
        assert count == 64 // index.tensors[victim].dtype.itemsize
        assert manifest["converted"][name] == [victim]
        return
    assert code != 0, output[-5000:]
    assert summary_rows(output) == {"debug": "failed"}, output[-3000:]
    assert re.search(rf"Task 1 of 2 .* failed its share .*{re.escape(repr(victim))}", output)
    assert not out.parent.exists() or not list(out.parent.iterdir())
