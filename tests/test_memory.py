"""Peak memory does not grow with the checkpoint: a conversion of a checkpoint many times the
batch budget stays within the budget plus a fixed margin over a tiny conversion's peak."""

from __future__ import annotations

import subprocess
import sys

import torch

from converter import demo
from tests.conftest import REPO

BUDGET_MB = 32
# Interpreter, torch, Hydra and the output's structure: what a tiny conversion also pays,
# measured, not assumed; this margin absorbs allocator slack between the two runs.
MARGIN_MB = 96


# Linux carries a process's peak RSS over fork and exec (the forked copy of the parent's memory
# counts as the child's until exec), so a child of this large pytest process would report
# pytest's peak. A small intermediate interpreter starts the converter and reports its peak.
_MEASURE = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "print(usage.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def peak_rss_mb(args: list[str]) -> float:
    """Runs ``convert.py`` and returns its peak resident set size as the kernel counted it."""
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, sys.executable, "convert.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout.split()[-1]) / 1024  # kilobytes on Linux


def test_peak_rss_is_bounded_by_the_batch_budget(tmp_path):
    small = demo.ModelShape(
        dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=64, hidden_dim=128
    )
    large = demo.ModelShape(
        dim=1024, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=8192, hidden_dim=2816
    )
    demo.write_steps(
        [
            (
                tmp_path / name / "step-1",
                demo.reference_weights(shape, seed=7),
                shape,
                {"generation": "G4", "kind": "weights_only"},
            )
            for name, shape in (("small", small), ("large", large))
        ]
    )
    checkpoint_mb = sum(f.stat().st_size for f in (tmp_path / "large" / "step-1").iterdir()) / 2**20
    assert checkpoint_mb > 10 * BUDGET_MB

    def run(name: str, shape: demo.ModelShape) -> float:
        return peak_rss_mb(
            [
                "experiment=debug",
                f"experiment.checkpoint_dir={tmp_path / name}",
                f"experiment.output={tmp_path / name / 'model.pt'}",
                f"experiment.model.n_heads={shape.n_heads}",
                f"experiment.model.n_layers={shape.n_layers}",
                f"experiment.model.dim={shape.dim}",
                f"experiment.model.vocab_size={shape.vocab_size}",
                f"experiment.model.hidden_dim={shape.hidden_dim}",
                "experiment.export_dtype=float32",
                f"batch_mb={BUDGET_MB}",
                "workers=2",
            ]
        )

    base, peak = run("small", small), run("large", large)
    print(f"checkpoint {checkpoint_mb:.0f} MB: peak RSS {peak:.0f} MB, tiny run {base:.0f} MB")
    assert peak - base < BUDGET_MB + MARGIN_MB
    out = torch.load(tmp_path / "large" / "model.pt", mmap=True, weights_only=True)
    assert len(out) == 2 + large.n_layers * 9 + 1
