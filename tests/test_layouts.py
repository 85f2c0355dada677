"""Every torchtitan layout era, full and weights-only, into every .pt output format and
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
from demo import writer as demo
from tests.conftest import (
    FULL_STEP,
    VARIANTS,
    WEIGHTS_ONLY_STEP,
    compose,
    layout_overrides,
    model_overrides,
)

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

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
@pytest.mark.parametrize("layout", list(demo.LAYOUTS))
@pytest.mark.parametrize("kind", ["full", "weights_only"])
@pytest.mark.parametrize("output_format", ["meta", "torchtune"])
@pytest.mark.parametrize("export_dtype", ["bfloat16", "float16", "float32", "keep"])
def test_layout_converts_exactly(
    tmp_path, layout_checkpoints, layout, variant, kind, output_format, export_dtype, caplog
):
    root, shape, saved = layout_checkpoints[layout, variant]
    step = FULL_STEP if kind == "full" else WEIGHTS_ONLY_STEP
    with caplog.at_level("INFO"):
        result = convert(
            tmp_path,
            root,
            shape,
            f"experiment.step={step}",
            f"experiment.export_dtype={export_dtype}",
            f"output_format={output_format}",
            *layout_overrides(layout),
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
    # A weights-only save is flat even before #1347: the names of #1347 explain it.
    assert manifest["source"]["layout"] == (
        "#1347" if layout == "v0.1.0" and kind == "weights_only" else layout
    )
    assert manifest["source"]["kind"] == kind
    # Nothing is silently dropped: every key of the checkpoint is converted or accounted for.
    stored = set(FileSystemReader(root / f"step-{step}").read_metadata().state_dict_metadata)
    converted = {k for sources in manifest["converted"].values() for k in sources}
    assert converted | set(manifest["dropped"]) == stored
    assert not converted & set(manifest["dropped"])
    if kind == "full":
        assert any(k.startswith("optimizer.") for k in manifest["dropped"])
    # ... and the log says what, a line per reason.
    for reason in set(manifest["dropped"].values()):
        assert (
            f"left out: {sum(r == reason for r in manifest['dropped'].values())} x {reason}: "
            in caplog.text
        )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_qkv_split_equals_torchtitans_own(tmp_path, layout_checkpoints, variant, caplog):
    """The fused ``wqkv`` split checked against torchtitan 0.3.0's ``FusedQKVLinear``, whose
    state-dict hook splits the fused weight on save, not against our own fusing code: the fused
    tensors are read from the checkpoint with torch's own DCP reader."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torchtitan.models.common.attention import FusedQKVLinear
    from torchtitan.models.common.linear import Linear

    root, shape, _ = layout_checkpoints["#2937 fuse_qkv", variant]
    step_dir = root / f"step-{FULL_STEP}"
    dcp_to_torch_save(step_dir, tmp_path / "whole.pt")
    stored = torch.load(tmp_path / "whole.pt", weights_only=True)
    with caplog.at_level("INFO"):
        result = convert(
            tmp_path,
            root,
            shape,
            f"experiment.step={FULL_STEP}",
            "output_format=meta",
            "experiment.export_dtype=float32",
        )
    assert result.status == "converted", result.error
    # The head counts come from the config; the log says the shapes cannot confirm them.
    assert f"split with n_heads={shape.n_heads} and n_kv_heads={shape.n_kv_heads}" in caplog.text
    ours = torch.load(tmp_path / "out" / "model.pt", mmap=True, weights_only=True)

    titan = FusedQKVLinear(
        FusedQKVLinear.Config(
            head_dim=shape.head_dim,
            n_heads=shape.n_heads,
            n_kv_heads=shape.n_kv_heads,
            wqkv=Linear.Config(
                in_features=shape.dim,
                out_features=shape.dim + 2 * shape.n_kv_heads * shape.head_dim,
            ),
        )
    )
    for layer in range(shape.n_layers):
        fused = stored[f"layers.{layer}.attention.qkv_linear.wqkv.weight"]
        with torch.no_grad():
            titan.wqkv.weight.copy_(fused)
        split = titan.state_dict()
        assert set(split) == {"wq.weight", "wk.weight", "wv.weight"}
        for name, tensor in split.items():
            key = f"layers.{layer}.attention.{name}"
            assert torch.equal(ours[key], tensor), key


@pytest.mark.parametrize("verify", ["true", "false"])
def test_pieces_across_chunk_boundaries_from_three_ranks(tmp_path, verify):
    """One kv head (n_kv_heads=1) and three writer ranks: the fused QKV's query rows span two
    ranks' chunks, its key and value rows lie inside the third, and 64-wide norms split
    unevenly (22/21/21). The whole conversion is exact with verify on and off."""
    from demo import writer as demo

    shape = demo.ModelShape(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=96, hidden_dim=160
    )
    root = tmp_path / "checkpoint"
    saved = demo.write_step(
        root / "step-5",
        demo.reference_weights(shape, seed=11),
        shape,
        layout="#2937 fuse_qkv",
        kind="full",
        world_size=3,
    )
    result = convert(
        tmp_path,
        root,
        shape,
        f"verify={verify}",
        "output_format=meta",
        "experiment.export_dtype=float32",
    )
    assert result.status == "converted", result.error
    loaded = torch.load(tmp_path / "out" / "model.pt", mmap=True, weights_only=True)
    assert sorted(loaded) == sorted(saved)
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_saved_rope_table_that_contradicts_the_settings_is_refused(
    tmp_path, layout_checkpoints, variant
):
    """v0.1.0's save keeps its RoPE table (unscaled then); the llama3 presets' scaling would
    make every consumer compute another: refused, saying what to set, and nothing written."""
    root, shape, _ = layout_checkpoints["v0.1.0", variant]
    result = convert(tmp_path, root, shape, f"experiment.step={FULL_STEP}")
    assert result.status == "failed"
    assert "'model.freqs_cis' in " in result.error and "RoPE frequencies" in result.error
    assert "set experiment.model.rope_scaling=false" in result.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
