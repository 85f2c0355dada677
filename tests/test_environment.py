"""An error caused by the environment names the environment, never the data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY, model_overrides

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

# Runs convert.py as `python convert.py ARGS` does, in an interpreter where the module named
# by the first argument cannot be imported, as in a virtualenv that lacks it.
WITHOUT = """
import runpy, sys
from importlib.abc import MetaPathFinder

hidden = sys.argv.pop(1)

class Hide(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == hidden or name.startswith(hidden + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
sys.argv = ["convert.py", *sys.argv[1:]]
runpy.run_path("convert.py", run_name="__main__")
"""


@pytest.mark.parametrize(
    "module, output_format, said",
    [
        ("numpy", "meta", "Numpy is not available"),
        ("safetensors", "hf", "Reading hf files back with safetensors failed"),
    ],
)
def test_a_missing_module_is_named_before_any_work(
    tiny_checkpoint, tmp_path, module, output_format, said
):
    output = tmp_path / "out" / ("model.pt" if output_format == "meta" else "model_hf")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT,
            module,
            "experiment=debug",
            f"output_format={output_format}",
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
    assert said in run.stderr, run.stderr[-3000:]
    assert "Python environment, not the data" in run.stderr, run.stderr[-3000:]
    assert "damaged" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not output.exists() and not output.parent.exists()


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
