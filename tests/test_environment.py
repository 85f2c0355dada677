"""An error caused by the environment names the environment, never the data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converter import demo
from tests.conftest import REPO, model_overrides

SHAPE = demo.ModelShape(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=64, hidden_dim=96)

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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("env") / "checkpoint"
    weights = demo.reference_weights(SHAPE, seed=3)
    demo.write_steps(
        [(root / "step-5", weights, SHAPE, {"generation": "G4", "kind": "weights_only",
                                            "export_dtype": torch.float32})]
    )  # fmt: skip
    return root


def test_missing_numpy_is_named_not_blamed_on_the_shard(checkpoint, tmp_path):
    output = tmp_path / "out" / "model.pt"
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_NUMPY,
            "experiment=debug",
            f"experiment.checkpoint_dir={checkpoint}",
            f"experiment.output={output}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            *model_overrides(SHAPE),
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
