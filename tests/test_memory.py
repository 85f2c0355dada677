"""Peak memory does not grow with the checkpoint: a conversion of a checkpoint whose largest
tensor is many times the batch budget stays within the budget plus a fixed margin over a tiny
conversion's peak, and the buffer pool never holds more than the budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converter import engine, job
from demo import writer as demo
from tests.conftest import REPO, compose, model_overrides

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

BUDGET_MB = 16
# Interpreter, torch, Hydra and the output's structure are what a tiny conversion also pays;
# this margin absorbs allocator slack between the two runs. A converter that holds one whole
# embedding (256 MiB) instead of row parts cannot stay under it.
MARGIN_MB = 48
SMALL = demo.ModelShape(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=64, hidden_dim=128)
# The embeddings and the head are 65536 x 1024 float32: 256 MiB each, 16x the budget.
LARGE = demo.ModelShape(
    dim=1024, n_layers=1, n_heads=8, n_kv_heads=8, vocab_size=65536, hidden_dim=2816
)

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


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memory")
    demo.write_steps(
        [
            (
                root / name / "step-1",
                demo.reference_weights(shape, seed=7),
                shape,
                {"layout": "#2937", "kind": "weights_only"},
            )
            for name, shape in (("small", SMALL), ("large", LARGE))
        ]
    )
    return root


def overrides(
    root: Path, name: str, shape: demo.ModelShape, out: Path, output_format: str = "meta"
) -> list[str]:
    return [
        "experiment=debug",
        f"experiment.checkpoint_dir={root / name}",
        f"experiment.output={out}",
        f"output_format={output_format}",
        *model_overrides(shape),
        "experiment.export_dtype=float32",
        f"batch_mb={BUDGET_MB}",
        "workers=2",
    ]


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


@pytest.mark.parametrize("output_format, name", [("meta", "{}.pt"), ("hf", "{}_hf")])
def test_peak_rss_is_bounded_by_the_batch_budget(checkpoints, tmp_path, output_format, name):
    """The .pt, and the Hugging Face folder (whose q and k rows are reordered on the way, and
    whose read-back maps every shard through safetensors' safe_open)."""
    largest = 4 * LARGE.vocab_size * LARGE.dim
    assert largest >= 8 * BUDGET_MB * 2**20
    small, large = (tmp_path / name.format(size) for size in ("small", "large"))
    base = peak_rss_mb(overrides(checkpoints, "small", SMALL, small, output_format))
    peak = peak_rss_mb(overrides(checkpoints, "large", LARGE, large, output_format))
    print(
        f"{output_format}: largest tensor {largest >> 20} MiB: peak RSS {peak:.0f} MB, "
        f"tiny run {base:.0f} MB"
    )
    assert peak - base < BUDGET_MB + MARGIN_MB
    if output_format == "meta":
        out = torch.load(large, mmap=True, weights_only=True)
    else:
        out = load_file(large / "model.safetensors")
    assert len(out) == 2 + LARGE.n_layers * 9 + 1


class _CountingPool(engine.BufferPool):
    """The engine's own pool, recording what it holds at most and how often it lends."""

    instances: list[_CountingPool] = []

    def __init__(self, budget: int) -> None:
        super().__init__(budget)
        self.peak = self.loans = 0
        _CountingPool.instances.append(self)

    def borrow(self, nbytes: int) -> torch.Tensor:
        buffer = super().borrow(nbytes)
        with self._cond:
            self.peak = max(self.peak, self._allocated)
            self.loans += 1
        return buffer


def test_the_pool_holds_no_more_than_the_budget_in_a_real_conversion(
    checkpoints, tmp_path, monkeypatch
):
    monkeypatch.setattr(engine, "BufferPool", _CountingPool)
    _CountingPool.instances.clear()
    out = tmp_path / "large.pt"
    result = job.run(compose(overrides(checkpoints, "large", LARGE, out)))
    assert result.status == "converted", result.error
    (pool,) = _CountingPool.instances
    assert pool.budget == BUDGET_MB << 20
    assert 0 < pool.peak <= pool.budget
    # Rows are split: the two 256 MiB tensors alone take one loan per part of at most a third
    # of each worker's share.
    part = pool.budget // (3 * 2)
    assert pool.loans >= 2 * (4 * LARGE.vocab_size * LARGE.dim) // part
