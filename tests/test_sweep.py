"""The three experiments through a real Hydra multirun of the entry point, as users run it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from torchtune.models.convert_weights import meta_to_tune

from demo import experiments
from tests.conftest import REPO, demo_workdir

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

EXPERIMENTS = ("debug", "500M", "debug_pretrained")


@pytest.fixture(scope="module")
def demo_root(demo_checkpoints, tmp_path_factory):
    """A working folder laid out as `make demo` leaves it: outputs/checkpoint_<name>/step-<N>.

    The 500M experiment has only its last (weights-only) save here; its full training save
    is ~6 GB and adds nothing the small experiments' full saves do not already test."""
    return demo_workdir(demo_checkpoints, tmp_path_factory.mktemp("demo")), demo_checkpoints[1]


def sweep(cwd, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "convert.py"), "-m", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


def summary_statuses(stdout: str) -> dict[str, str]:
    """experiment -> status, from the end-of-sweep table: its rows follow the header and its
    rule, up to the first blank line."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["experiment", "status"])
    rows = []
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return {row[0]: row[1] for row in rows}


def latest_weights(saved: dict, name: str) -> dict[str, torch.Tensor]:
    return saved[name][max(saved[name])]


def test_sweep_of_the_three_experiments(demo_root):
    root, saved = demo_root
    run = sweep(root, "experiment=" + ",".join(EXPERIMENTS))
    assert run.returncode == 0, run.stderr
    for name in EXPERIMENTS:
        out = root / "outputs" / f"checkpoint_{name}" / "final_model.pt"
        tensors = torch.load(out, mmap=True, weights_only=True)
        manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
        # The dtype the experiment's own YAML asks for, not what the converter says it wrote.
        asked = yaml.safe_load((REPO / "conf" / "experiment" / f"{name}.yaml").read_text())
        export = getattr(torch, asked["export_dtype"])
        assert all(t.dtype == export for t in tensors.values()), name
        expected = {k: v.to(export) for k, v in latest_weights(saved, name).items()}
        assert sorted(tensors) == sorted(expected), name
        assert all(torch.equal(tensors[k], v) for k, v in expected.items()), name
        assert manifest["source"]["step"] == max(saved[name])
        assert (out.parent / "final_model.pt.torchtune.yaml").exists()
    # The end-of-sweep summary lists every experiment.
    status = summary_statuses(run.stdout)
    assert status == {name: "converted" for name in EXPERIMENTS}, run.stdout
    # A second identical sweep finds every output up to date.
    again = sweep(root, "experiment=" + ",".join(EXPERIMENTS))
    assert again.returncode == 0, again.stderr
    assert summary_statuses(again.stdout) == {name: "skipped" for name in EXPERIMENTS}


def test_sweep_with_overrides(demo_root):
    root, saved = demo_root
    run = sweep(
        root,
        "experiment=debug,debug_pretrained",
        "output_format=torchtune",
        "experiment.export_dtype=float32",
        "experiment.output=${experiment.checkpoint_dir}/tune_fp32/model.pt",
        "workers=2",
    )
    assert run.returncode == 0, run.stderr
    for name in ("debug", "debug_pretrained"):
        out = root / "outputs" / f"checkpoint_{name}" / "tune_fp32" / "model.pt"
        tensors = torch.load(out, mmap=True, weights_only=True)
        expected = {k: v.float() for k, v in latest_weights(saved, name).items()}
        if experiments.DEMO_EXPERIMENTS[name][0].tied_embeddings:
            expected.pop("output.weight")
        expected = meta_to_tune(expected)
        assert sorted(tensors) == sorted(expected)
        assert all(torch.equal(tensors[k], v) for k, v in expected.items())
        yaml_text = (out.parent / "model.pt.torchtune.yaml").read_text()
        assert "FullModelTorchTuneCheckpointer" in yaml_text
        # Where torchtune saves: beside the output's folder (torchtune refuses one inside the
        # checkpoint_dir), and of this output alone.
        saves = yaml.safe_load(yaml_text)["checkpointer"]["output_dir"]
        assert saves == str(out.parent.with_name("tune_fp32_torchtune") / "model")


@pytest.mark.parametrize(
    "spelled", [["experiment=debug,debug_pretrained"], ["experiment=glob(debug*)"]]
)
@pytest.mark.parametrize("subdir", [[], ["hydra.sweep.subdir=shared"], ["hydra.job.chdir=true"]])
def test_sweep_fails_when_one_experiment_fails(demo_root, tmp_path, spelled, subdir):
    """However the sweep is spelled, when its jobs share an output folder for their logs (a
    hydra.sweep.subdir without the job number), and when each runs in its own folder
    (hydra.job.chdir), each job's result is summed up."""
    root, _ = demo_root
    run = sweep(
        root,
        *spelled,
        *subdir,
        f"experiment.output={tmp_path}/${{experiment.name}}.pt",
        # Valid for debug (16 heads), contradicts debug_pretrained's fused QKV shapes.
        "experiment.model.n_heads=16",
        "experiment.model.n_kv_heads=null",
    )
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert summary_statuses(run.stdout) == {"debug": "converted", "debug_pretrained": "failed"}
    assert "reported no result" not in run.stdout + run.stderr
    assert (tmp_path / "debug.pt").exists() and not (tmp_path / "debug_pretrained.pt").exists()


def test_a_sweep_folder_given_again_sums_up_this_sweep_alone(demo_root, tmp_path):
    """hydra.sweep.dir reused: the last sweep's job results there are not this sweep's."""
    root, _ = demo_root
    fixed = [
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"experiment.output={tmp_path}/${{experiment.name}}.pt",
    ]
    first = sweep(root, "experiment=debug,debug_pretrained", "experiment.step=99", *fixed)
    assert first.returncode != 0
    assert summary_statuses(first.stdout) == {"debug": "failed", "debug_pretrained": "failed"}
    second = sweep(root, "experiment=debug", *fixed)
    assert second.returncode == 0, second.stdout + second.stderr
    assert summary_statuses(second.stdout) == {"debug": "converted"}
