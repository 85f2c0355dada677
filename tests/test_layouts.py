"""Every torchtitan layout generation, full and weights-only, into every output format and
export dtype, on checkpoints written by real two-rank FSDP2 saves. Outputs are loaded the way
torchtune loads them and compared with the saved weights, bit for bit after the cast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torchtune.models.convert_weights import meta_to_tune

from converter import job
from tests.conftest import FULL_STEP, VARIANTS, WEIGHTS_ONLY_STEP, compose, model_overrides

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def expected_output(saved: dict, export_dtype: str, output_format: str, tied: bool) -> dict:
    """What torchtune should find in the file, derived from the saved weights independently of
    the converter's key tables: torchtune's own meta_to_tune names the torchtune format."""
    out = {k: v if export_dtype == "keep" else v.to(DTYPES[export_dtype]) for k, v in saved.items()}
    if output_format == "meta":
        # torchtune's Meta checkpointer, with model_type LLAMA3_2, pops output.weight itself.
        return out
    if tied:
        out.pop("output.weight")  # torchtune's tied model has no such parameter
    return meta_to_tune(out)


def convert(tmp_path, root, shape, *overrides: str) -> job.JobResult:
    cfg = compose(
        [
            "experiment=debug",
            f"experiment.checkpoint_dir={root}",
            f"experiment.output={tmp_path / 'out' / 'model.pt'}",
            *model_overrides(shape),
            *overrides,
        ]
    )
    return job.run(cfg)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("generation", ["G1", "G2", "G3", "G4"])
@pytest.mark.parametrize("kind", ["full", "weights_only"])
@pytest.mark.parametrize("output_format", ["meta", "torchtune"])
@pytest.mark.parametrize("export_dtype", ["bfloat16", "float16", "float32", "keep"])
def test_layout_converts_exactly(
    tmp_path, layout_checkpoints, generation, variant, kind, output_format, export_dtype
):
    root, shape, saved = layout_checkpoints[generation, variant]
    step = FULL_STEP if kind == "full" else WEIGHTS_ONLY_STEP
    result = convert(
        tmp_path,
        root,
        shape,
        f"experiment.step={step}",
        f"experiment.export_dtype={export_dtype}",
        f"output_format={output_format}",
    )
    assert result.status == "converted", result.error

    out = torch.load(result.output, mmap=True, weights_only=True)
    expected = expected_output(saved[step], export_dtype, output_format, shape.tied_embeddings)
    assert sorted(out) == sorted(expected)
    for key, want in expected.items():
        assert out[key].dtype == want.dtype, key
        assert out[key].shape == want.shape, key
        assert torch.equal(out[key], want), key

    manifest = json.loads(Path(result.output + ".manifest.json").read_text())
    assert manifest["source"]["generation"] == (
        "G2" if generation == "G1" and kind == "weights_only" else generation
    )
    assert manifest["source"]["kind"] == kind
    # Nothing is silently dropped: every key of the checkpoint is converted or accounted for.
    stored = set(FileSystemReader(root / f"step-{step}").read_metadata().state_dict_metadata)
    converted = {k for sources in manifest["converted"].values() for k in sources}
    assert converted | set(manifest["dropped"]) == stored
    assert not converted & set(manifest["dropped"])
    if kind == "full":
        assert any(k.startswith("optimizer.") for k in manifest["dropped"])
