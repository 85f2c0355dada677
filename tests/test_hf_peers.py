"""The Hugging Face folder, checked with the real peers. torchtitan 0.3.0's own CheckpointManager
writes the checkpoints (the session's ``titan_run``: llama3 debugmodel, and a grouped-query
model with tied embeddings), the converter writes ``output_format=hf`` folders through the
Hydra entry point, and for every folder:

1. every tensor equals what torchtitan's own ``Llama3StateDictAdapter.to_hf`` makes of the
   weights as saved (the export dtype kept), bit for bit, with the same key set;
2. ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` gives torchtitan's logits on
   fixed tokens, within 1e-4 computed in float32;
3. torchtune 0.6.1's ``FullModelHFCheckpointer`` loads it strictly into the llama3.1 builder
   (llama3.2 with tied embeddings), with the same logits, also through the emitted snippet;
4. torchtitan reads it back through its own Hugging Face path (``HuggingFaceStorageReader``
   and ``from_hf``, as ``checkpoint.initial_load_in_hf`` does) and reproduces its logits.

bfloat16: the bfloat16 export is held, computed in float32, to torchtitan's logits on the same
bfloat16 weights; what bfloat16 costs is measured separately, as tests/test_peers.py does: the
weights alone (against torchtitan on the float32 weights before the export), and transformers'
own default load, which computes in bfloat16 as config.json's dtype says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from demo import writer as demo
from tests.conftest import (
    REPO,
    as_trained,
    layout_overrides,
    make_tokenizer,
    titan_overrides,
    write_older_layouts,
)
from tests.peers import titan_writer, tune_loader

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

FP32_TOL = 1e-4
# transformers computing in bfloat16 (its default load of the bfloat16 export) against
# torchtitan in float32 on the same weights: measured here as 0.063 on debugmodel, with logits
# up to about 6 (the bfloat16 weights alone, computed in float32: 0.046).
BF16_COMPUTE_TOL = 0.25


def hf_sweep(checkpoint_dirs: list[str], out_root: Path, info: dict, *sweep: str) -> list[Path]:
    """One real multirun of the entry point into hf folders; returns them."""
    assets = out_root / "assets"
    make_tokenizer(assets, info["vocab_size"])
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "convert.py"),
            "-m",
            "experiment=debug",
            "experiment.checkpoint_dir=" + ",".join(checkpoint_dirs),
            "experiment.export_dtype=keep",
            "output_format=hf",
            f"experiment.tokenizer_dir={assets}",
            f"experiment.output={out_root}/${{hydra:job.num}}_hf",
            *titan_overrides(info),
            *sweep,
        ],
        cwd=out_root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return sorted(out_root.glob("*_hf"))


def manifest(folder: Path) -> dict:
    return json.loads((folder / "titan2tune.manifest.json").read_text())


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found |= load_file(shard)
    return found


@torch.no_grad()
def transformers_logits(folder: Path, tokens: torch.Tensor, **kwargs) -> tuple[torch.Tensor, str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    return model(tokens).logits.float(), str(model.dtype).removeprefix("torch.")


def torchtune_logits(folder: Path, info: dict, tokens: torch.Tensor, tmp: Path) -> torch.Tensor:
    """torchtune's HF checkpointer, strict into the builder the test harness picks itself."""
    from torchtune.training import FullModelHFCheckpointer

    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(folder),
        checkpoint_files=sorted(p.name for p in folder.glob("*.safetensors")),
        model_type=tune_loader.model_type_for(info),
        output_dir=str(tmp / f"tune_{folder.name}"),
    )
    model = tune_loader.build_tune_model(info)
    model.load_state_dict(checkpointer.load_checkpoint()["model"], strict=True)
    return tune_loader.tune_logits(model, tokens)


def torchtitan_round_trip(folder: Path, info: dict) -> tuple[torch.nn.Module, dict]:
    """torchtitan's own way in from a Hugging Face folder (CheckpointManager.dcp_load with
    initial_load_in_hf): its adapter's to_hf for the keys, DCP with the adapter's
    HuggingFaceStorageReader, from_hf. Returns the model and the state dict read."""
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    cfg = titan_writer.model_config_of(info)
    model = titan_writer.build_unsharded(cfg)
    adapter = Llama3StateDictAdapter(cfg, None)
    hf_state = adapter.to_hf(model.state_dict())
    dcp.load(hf_state, storage_reader=adapter.get_hf_storage_reader(str(folder)), no_dist=True)
    return model, adapter.from_hf(hf_state)


def check_folder(
    folder: Path, saved: dict[str, torch.Tensor], expected: torch.Tensor, info: dict, ref, tmp
) -> dict[str, float]:
    """The four checks of the module docstring on one folder converted from ``saved``
    (torchtitan 0.3.0's keys, as saved), against torchtitan's logits ``expected`` on those
    weights. Returns the measured differences."""
    tokens = ref["tokens"]
    cfg = titan_writer.model_config_of(info)
    want = titan_writer.titan_to_hf(cfg, saved)
    found = hf_tensors(folder)
    assert sorted(found) == sorted(want)
    for key, tensor in want.items():
        assert found[key].dtype == tensor.dtype and torch.equal(found[key], tensor), key

    logits, _ = transformers_logits(folder, tokens, dtype=torch.float32)
    diffs = {"transformers": (logits - expected).abs().max().item()}
    tune = torchtune_logits(folder, info, tokens, tmp)
    diffs["torchtune"] = (tune - expected).abs().max().item()
    snippet = tune_loader.instantiate_from_yaml(folder / "titan2tune.torchtune.yaml")
    assert torch.equal(tune_loader.tune_logits(snippet, tokens), tune)

    model, read = torchtitan_round_trip(folder, info)
    for key, tensor in saved.items():
        assert torch.equal(read[key], tensor.float()), key  # the model's own dtype
    titan = titan_writer.titan_logits(model, read, tokens)
    diffs["torchtitan"] = (titan - expected).abs().max().item()
    for peer, diff in diffs.items():
        assert diff < FP32_TOL, (folder, peer, diff)
    return diffs


def test_torchtitan_checkpoints_as_hf_folders(titan_run, tmp_path):
    """The full float32 checkpoint and the model-only export, each as one file and sharded."""
    info, ref = titan_run
    out_root = tmp_path / "converted"
    out_root.mkdir()
    folders = hf_sweep(
        [f"{info['dump']}/checkpoint"],
        out_root,
        info,
        "experiment.step=2,3",
        "output_format.max_shard_size=5GB,1MB",
    )
    assert len(folders) == 4
    keys = tune_loader.titan_model_keys(info)
    for folder in folders:
        recorded = manifest(folder)
        step = recorded["source"]["step"]
        expected = ref["steps"][f"step-{step}"]
        saved = titan_writer.read_saved_model_weights(info["step_dirs"][f"step-{step}"], keys)
        sharded = len(list(folder.glob("*.safetensors"))) > 1
        assert sharded == (recorded["config"]["output_format"]["max_shard_size"] == "1MB")
        diffs = check_folder(folder, saved, expected["logits_saved"], info, ref, tmp_path)
        label = f"{info['variant']} step-{step} ({expected['saved_dtype']}, "
        label += f"{'sharded' if sharded else 'one file'})"
        print(label, ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))

        # transformers' default load takes config.json's dtype: the export's.
        logits, dtype = transformers_logits(folder, ref["tokens"])
        assert dtype == expected["saved_dtype"]
        if dtype == "bfloat16":
            weights = (
                transformers_logits(folder, ref["tokens"], dtype=torch.float32)[0]
                - expected["logits"]
            )
            weights_effect = weights.abs().max().item()
            compute_effect = (logits - expected["logits_saved"]).abs().max().item()
            print(f"{label}: bfloat16 weights {weights_effect:.3f}, compute {compute_effect:.3f}")
            assert 1e-3 < weights_effect < 0.25, weights_effect
            assert 1e-3 < compute_effect < BF16_COMPUTE_TOL, compute_effect


def test_older_layouts_as_hf_folders(titan_run, tmp_path):
    """The older layouts (nested with freqs_cis, flat Meta names, qkv_linear with output, fused
    wqkv), written by demo.writer from torchtitan's saved weights, converted to hf folders."""
    info, ref = titan_run
    written = write_older_layouts(info, tmp_path)
    # One sweep per set of settings: v0.1.0's save says its RoPE was unscaled.
    sweeps: dict[tuple[str, ...], list[str]] = {}
    for folder, (layout, _) in written.items():
        sweeps.setdefault(tuple(layout_overrides(layout)), []).append(folder)
    layouts = set()
    for i, (overrides, dirs) in enumerate(sweeps.items()):
        out_root = tmp_path / f"converted{i}"
        out_root.mkdir()
        folders = hf_sweep(dirs, out_root, info, *overrides)
        assert len(folders) == len(dirs)
        trained = as_trained(info, written[dirs[0]][0])
        titan_model = titan_writer.build_unsharded(titan_writer.model_config_of(trained))
        for folder in folders:
            source = manifest(folder)["source"]
            saved = titan_writer.meta_to_titan(written[source["checkpoint_dir"]][1])
            expected = titan_writer.titan_logits(titan_model, saved, ref["tokens"])
            diffs = check_folder(folder, saved, expected, trained, ref, tmp_path)
            said = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
            print(info["variant"], source["layout"], said)
            layouts.add(source["layout"])
    assert layouts == set(demo.LAYOUTS) - {demo.TORCHTITAN_0_3}
