"""An error caused by the environment names the environment, never the data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY, model_overrides

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

# Runs convert.py as `python convert.py ARGS` does, in an interpreter where numpy cannot be
# imported, as in a virtualenv that lacks it.
WITHOUT_NUMPY = """
import runpy, sys
from importlib.abc import MetaPathFinder

class HideNumpy(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideNumpy())
sys.argv = ["convert.py", *sys.argv[1:]]
runpy.run_path("convert.py", run_name="__main__")
"""


def test_missing_numpy_is_named_not_blamed_on_the_shard(tiny_checkpoint, tmp_path):
    output = tmp_path / "out" / "model.pt"
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_NUMPY,
            "experiment=debug",
            f"experiment.checkpoint_dir={tiny_checkpoint}",
            f"experiment.output={output}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            *model_overrides(TINY),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "Numpy is not available" in run.stderr, run.stderr[-3000:]
    assert "Python environment, not the data" in run.stderr, run.stderr[-3000:]
    assert "damaged" not in run.stderr, run.stderr[-3000:]
    assert not output.exists()


def test_demo_refuses_a_disk_too_small_before_writing(tmp_path):
    from tests.test_faults import tmpfs

    with tmpfs(tmp_path / "small", "64m") as small:
        run = subprocess.run(
            [sys.executable, "-m", "demo", "--out", str(small / "outputs")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode != 0
        assert str(small / "outputs") in run.stderr, run.stderr[-3000:]
        assert "GiB are free" in run.stderr and "--skip-full 500M" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        assert list((small / "outputs").rglob("*")) == []
