"""#18: a demo rank aborted after its work was done ("terminate called without an active
exception", SIGABRT) in about 1 run in 15. The race, made to happen every time: gdb holds one
rank's gloo run loop thread between completing the save's last collective and dropping it
(``tests/gloo_schedule.py``), which a loaded machine's scheduler does now and then."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from demo import writer
from tests.conftest import REPO, TINY, unavailable

pytestmark = pytest.mark.slow

# One rank of the demo writer, as torch's spawn runs it: argv is rank, ending, jobs file. The
# ending "interpreter" is the rank as it was before the fix: exit_rank does nothing, so the
# rank's script ends and the interpreter finalizes.
RANK = """
import json, sys
from pathlib import Path
from demo import writer
if sys.argv[2] == "interpreter":
    writer.exit_rank = lambda: None
writer._rank_main(int(sys.argv[1]), json.loads(Path(sys.argv[3]).read_text()))
"""
TERMINATE = "terminate called without an active exception"
# What Py_FinalizeEx calls right after it marks the runtime finalizing, by CPython version.
FINALIZING_AT = {(3, 10): "_PyThreadState_DeleteExcept", (3, 11): "_PyThreadState_DeleteExcept",
                 (3, 12): "_PyThreadState_DeleteExcept"}  # fmt: skip


def run_ranks(root: Path, ending: str, hold_at: int) -> tuple[list[str], str]:
    """Rank 0 as the writer runs it; rank 1 under gdb with ``ending``, holding work
    ``hold_at``. Returns the schedule gdb went through and rank 1's log (gdb's and the rank's
    output)."""
    if platform.machine() != "x86_64" or sys.version_info[:2] not in FINALIZING_AT:
        pytest.skip("the schedule reads x86-64 registers and CPython 3.10-3.12's finalization")
    gdb = shutil.which("gdb") or unavailable("gdb is not installed (apt-get install gdb)")
    root.mkdir()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    spec = writer.StepSpec(root / "checkpoint" / "step-1", None, TINY, "#2937", "weights_only")
    jobs_file = root / "jobs.json"
    jobs_file.write_text(json.dumps(writer.rank_jobs([spec], 2, store.port, root)))
    rank = [sys.executable, "-c", RANK]
    log, said = root / "gdb.log", root / "schedule.log"
    env = {
        **os.environ,
        "HOLD_AT": str(hold_at),
        "FINALIZING_AT": FINALIZING_AT[sys.version_info[:2]],
        "SCHEDULE_LOG": str(said),
    }
    with log.open("w") as out:
        rank0 = subprocess.Popen([*rank, "0", "exit_rank", jobs_file], cwd=REPO)
        # gdb reads commands from stdin once the script has run: a pipe kept open lets the
        # script's own events end the session (it quits when the rank ends).
        rank1 = subprocess.Popen(
            [gdb, "-q", "-nx", "-x", REPO / "tests" / "gloo_schedule.py", "--args",
             *rank, "1", ending, jobs_file],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            codes = rank1.wait(timeout=180), rank0.wait(timeout=60)
        except subprocess.TimeoutExpired:
            codes = None
        finally:
            rank1.stdin.close()  # EOF: a gdb still running quits, and its rank with it
            for process in (rank1, rank0):
                if process.poll() is None:
                    process.kill()
                process.wait()
    text = log.read_text()
    assert codes == (0, 0), f"gdb and rank 0 ended with {codes}:\n{text[-3000:]}"
    return said.read_text().splitlines() if said.exists() else [], text


@pytest.fixture(scope="module")
def rank_works(tmp_path_factory) -> tuple[int, int]:
    """Rank 1's works, counted: the number of the save's last collective (the last before the
    barriers that end the rank: a barrier's work holds no tensors), and of all."""
    schedule, log = run_ranks(tmp_path_factory.mktemp("count") / "run", "exit_rank", 0)
    assert "exit code 0" in schedule, log[-3000:]
    works = [line.split() for line in schedule if line.startswith("work ")]
    total = len(works)
    while works and works[-1][2] == "AsyncBarrierWork":
        works.pop()
    assert works and works[-1][2] == "AsyncBroadcastWork", schedule  # DCP's last, a broadcast
    return int(works[-1][1]), total


def test_the_race_aborts_a_rank_that_ends_in_the_interpreter(rank_works, tmp_path):
    """The schedule reproduces the abort as filed, by the mechanism of ``exit_rank``'s
    docstring; this is what the next test would see if the fix stopped working."""
    save_last_work, _ = rank_works
    schedule, log = run_ranks(tmp_path / "run", "interpreter", save_last_work)
    held = schedule[0].split()[-3] if schedule else "?"
    assert schedule[:5] == [
        f"work {save_last_work} complete; its run loop thread {held} is held",
        "the main thread finalizes",
        "the held thread, dropping the work, takes the GIL",
        "the runtime is finalizing",
        f"thread {held} received SIGABRT",
    ], f"{schedule}\n{log[-3000:]}"
    assert TERMINATE in log
    # The held thread's stack as it aborts: CPython ends it while it asks for the GIL to release
    # a tensor's PyObject, and the unwinding meets a noexcept frame.
    for frame in ("std::terminate", "PyThread_exit_thread", "TensorImpl::decref_pyobject"):
        assert frame in log, frame


def test_exit_rank_ends_the_rank_before_the_race_can_land(rank_works, tmp_path):
    """The same schedule against the writer as it is: the rank ends, exit code 0, with the
    run loop thread still held."""
    save_last_work, total = rank_works
    schedule, log = run_ranks(tmp_path / "run", "exit_rank", save_last_work)
    held = schedule[0].split()[-3] if schedule else "?"
    assert schedule == [
        f"work {save_last_work} complete; its run loop thread {held} is held",
        "exit code 0",
        f"works {total}",
    ], f"{schedule}\n{log[-3000:]}"
    assert TERMINATE not in log
