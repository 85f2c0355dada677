"""The promise, checked with the real peers: torchtitan writes the checkpoints, our converter
(through the Hydra entry point) converts them, torchtune loads the result the way a recipe does,
and torchtune's logits match torchtitan's on the same tokens.

Tolerances: float32 exports within 1e-4 max abs difference of torchtitan's logits. bfloat16
exports are compared with torchtitan's logits *from the same bfloat16-rounded weights* (computed
in float32), also within 1e-4; the difference that bfloat16 weights alone cause (measured here
as 0.046 on debugmodel and 0.068 on the GQA/tied model against the float32 weights) is asserted
separately to be what it is, so the two effects are not confused.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import (
    REPO,
    as_trained,
    layout_overrides,
    titan_overrides,
    write_older_layouts,
)
from tests.peers import titan_writer, tune_loader

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

FP32_TOL = 1e-4


def convert_sweep(checkpoint_dirs: list[str], out_root, info: dict, *sweep: str) -> None:
    """One real multirun of the entry point over checkpoints, steps and formats."""
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "convert.py"),
            "-m",
            "experiment=debug",
            "experiment.checkpoint_dir=" + ",".join(checkpoint_dirs),
            "experiment.export_dtype=keep",
            "output_format=meta,torchtune",
            f"experiment.output={out_root}/${{hydra:job.num}}_${{output_format.name}}/model.pt",
            *titan_overrides(info),
            *sweep,
        ],
        cwd=out_root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def outputs(out_root) -> dict[str, list]:
    found: dict[str, list] = {"meta": [], "torchtune": []}
    for path in sorted(out_root.glob("*_*/model.pt")):
        found[path.parent.name.split("_", 1)[1]].append(path)
    return found


def tune_logits_of(path, fmt: str, info: dict, tmp_path) -> torch.Tensor:
    model = tune_loader.load_tune_model(fmt, path.parent, path.name, tmp_path / "tune_out", info)
    return tune_loader.tune_logits(model.eval(), REF_TOKENS[info["dump"]])


REF_TOKENS: dict[str, torch.Tensor] = {}


def test_torchtitan_checkpoints_load_in_torchtune_with_matching_logits(titan_run, tmp_path):
    info, ref = titan_run
    REF_TOKENS[info["dump"]] = ref["tokens"]
    out_root = tmp_path / "converted"
    out_root.mkdir()
    convert_sweep([f"{info['dump']}/checkpoint"], out_root, info, "experiment.step=2,3")
    found = outputs(out_root)
    assert len(found["meta"]) == len(found["torchtune"]) == 2
    for fmt, paths in found.items():
        for path in paths:
            step = _step_of(path)
            expected = ref["steps"][f"step-{step}"]
            logits = tune_logits_of(path, fmt, info, tmp_path)
            diff = (logits - expected["logits_saved"]).abs().max().item()
            print(f"{info['variant']} step-{step} {fmt} ({expected['saved_dtype']}): {diff:.2e}")
            assert diff < FP32_TOL, (path, diff)
            # The emitted recipe snippet instantiates and gives the same logits.
            model = tune_loader.instantiate_from_yaml(path.with_name("model.pt.torchtune.yaml"))
            snippet_logits = tune_loader.tune_logits(model, ref["tokens"])
            assert torch.equal(snippet_logits, logits)
            if expected["saved_dtype"] == "bfloat16":
                # The converted bfloat16 model against torchtitan's on the float32 weights
                # before the export: the rounding shows, well above float32 noise, and bounded.
                bf16_effect = (logits - expected["logits"]).abs().max().item()
                print(f"{info['variant']} step-{step} {fmt}: bfloat16 effect {bf16_effect:.3f}")
                assert 1e-3 < bf16_effect < 0.25, bf16_effect


def test_older_layouts_from_the_same_weights(titan_run, tmp_path):
    """The older layouts (nested with freqs_cis, flat Meta names, qkv_linear with output, fused
    wqkv) are not writable by today's torchtitan: write them from torchtitan's saved weights with
    demo.writer (two FSDP2 ranks, each era's keys, torchtitan PRs cited there), convert, and
    hold torchtune's logits to torchtitan's on the weights as saved."""
    info, ref = titan_run
    REF_TOKENS[info["dump"]] = ref["tokens"]
    written = write_older_layouts(info, tmp_path)
    # One sweep per set of settings: v0.1.0's save says its RoPE was unscaled.
    sweeps: dict[tuple[str, ...], list[str]] = {}
    for folder, (layout, _) in written.items():
        sweeps.setdefault(tuple(layout_overrides(layout)), []).append(folder)
    for i, (overrides, dirs) in enumerate(sweeps.items()):
        out_root = tmp_path / f"converted{i}"
        out_root.mkdir()
        convert_sweep(dirs, out_root, info, *overrides)
        layout = written[dirs[0]][0]
        trained = as_trained(info, layout)
        titan_model = titan_writer.build_unsharded(titan_writer.model_config_of(trained))
        for fmt, paths in outputs(out_root).items():
            assert len(paths) == len(dirs)
            for path in paths:
                source = _manifest(path)["source"]
                as_saved = titan_writer.meta_to_titan(written[source["checkpoint_dir"]][1])
                expected = titan_writer.titan_logits(titan_model, as_saved, ref["tokens"])
                logits = tune_logits_of(path, fmt, trained, tmp_path)
                diff = (logits - expected).abs().max().item()
                print(f"{info['variant']} {source['layout']} {fmt}: {diff:.2e}")
                assert diff < FP32_TOL, (path, diff)


def _manifest(path) -> dict:
    import json

    return json.loads(path.with_name("model.pt.manifest.json").read_text())


def _step_of(path) -> int:
    return _manifest(path)["source"]["step"]
