"""Shared fixtures: the Hydra config as the entry point composes it, and real DCP checkpoints
written by real two-rank FSDP2 saves (demo.writer), once per test session."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from converter.config import register_configs
from demo import experiments
from demo import writer as demo

REPO = Path(__file__).resolve().parent.parent

register_configs()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(message: str) -> NoReturn:
    """What a test cannot be run without is missing: skipped on a developer's machine, a
    failure in CI (CI=true), where `.ci/run` provides it, so no test goes silent there."""
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def compose(overrides: list[str]) -> DictConfig:
    """The job config exactly as ``python convert.py <overrides>`` composes it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="convert", overrides=overrides)


# Two model variants cover the cases the key maps must get right: plain multi-head attention
# with a separate output head, and grouped-query attention with tied embeddings.
VARIANTS = {
    "mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=96, hidden_dim=160),
    "gqa_tied": dict(
        dim=64,
        n_layers=2,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=96,
        hidden_dim=160,
        tied_embeddings=True,
    ),
}
FULL_STEP, WEIGHTS_ONLY_STEP = 10, 20


@pytest.fixture(scope="session")
def layout_checkpoints(tmp_path_factory):
    """A torchtitan checkpoint folder per layout era and model variant, each with a full
    training save at FULL_STEP and a bfloat16 weights-only save at WEIGHTS_ONLY_STEP, all
    written by two FSDP2 ranks in one start of the ranks (starting them is the slow part).
    Returns {(layout, variant): (folder, shape, {step: weights as saved})}."""
    base = tmp_path_factory.mktemp("layouts")
    cases = [(layout, v) for layout in demo.LAYOUTS for v in VARIANTS]
    steps, folders = [], {}
    for seed, (layout, variant) in enumerate(cases, start=1):
        shape = demo.ModelShape(**VARIANTS[variant])
        weights = demo.reference_weights(shape, seed=seed)
        folder = base / f"{layout.replace('#', '').replace(' ', '_')}_{variant}" / "checkpoint"
        folders[layout, variant] = folder, shape
        steps.append(
            (folder / f"step-{FULL_STEP}", weights, shape, {"layout": layout, "kind": "full"})
        )
        steps.append(
            (
                folder / f"step-{WEIGHTS_ONLY_STEP}",
                weights,
                shape,
                {"layout": layout, "kind": "weights_only", "export_dtype": torch.bfloat16},
            )
        )
    saved = demo.write_steps(steps)
    return {
        case: (root, shape, {FULL_STEP: saved[2 * i], WEIGHTS_ONLY_STEP: saved[2 * i + 1]})
        for i, (case, (root, shape)) in enumerate(folders.items())
    }


def model_overrides(shape) -> list[str]:
    return [
        f"experiment.model.n_heads={shape.n_heads}",
        f"experiment.model.n_kv_heads={shape.n_kv_heads}",
        f"experiment.model.tied_embeddings={str(shape.tied_embeddings).lower()}",
        f"experiment.model.dim={shape.dim}",
        f"experiment.model.n_layers={shape.n_layers}",
        f"experiment.model.vocab_size={shape.vocab_size}",
        f"experiment.model.hidden_dim={shape.hidden_dim}",
    ]


def trained_rope_scaling(layout: str) -> bool:
    """Whether a save in ``layout`` says its model trained with RoPE scaling: a nested save
    keeps its RoPE table, which the converter checks, and demo.writer's is unscaled, as
    torchtitan's was then (``demo.writer.rope_table``)."""
    return not demo.LAYOUTS[layout].nested


def layout_overrides(layout: str) -> list[str]:
    """The settings that converting a save in ``layout`` takes besides the model's shape."""
    return [] if trained_rope_scaling(layout) else ["experiment.model.rope_scaling=false"]


def as_trained(info: dict, layout: str) -> dict:
    """A torchtitan run's ``model.json`` as the model saved in ``layout`` would say it."""
    return info if trained_rope_scaling(layout) else {**info, "rope_scaling": None}


def titan_overrides(info: dict) -> list[str]:
    """The model settings of a torchtitan run (its ``model.json``), as the command line
    gives them."""
    return [
        f"experiment.model.n_heads={info['n_heads']}",
        f"experiment.model.n_kv_heads={info['n_kv_heads']}",
        f"experiment.model.tied_embeddings={str(info['tied']).lower()}",
        f"experiment.model.dim={info['dim']}",
        f"experiment.model.n_layers={info['n_layers']}",
        f"experiment.model.vocab_size={info['vocab_size']}",
        f"experiment.model.hidden_dim={info['hidden_dim']}",
        f"experiment.model.norm_eps={info['norm_eps']}",
        f"experiment.model.rope_theta={info['rope_theta']}",
        f"experiment.model.max_seq_len={info['max_seq_len']}",
    ]


# A one-layer model, for the tests of a user's mistakes: converting it takes a second.
TINY = demo.ModelShape(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=64, hidden_dim=96)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint folder with one float32 weights-only save of TINY (torchtitan 0.3.0's
    layout), at step 5."""
    root = tmp_path_factory.mktemp("tiny") / "checkpoint"
    weights = demo.reference_weights(TINY, seed=3)
    demo.write_steps(
        [(root / "step-5", weights, TINY, {"layout": "#2937", "kind": "weights_only",
                                           "export_dtype": torch.float32})]
    )  # fmt: skip
    return root


@pytest.fixture(scope="session", params=[("debugmodel", "bfloat16"), ("gqa_tied", "float32")])
def titan_run(request, tmp_path_factory):
    """torchtitan 0.3.0's own CheckpointManager on two gloo ranks with FSDP2: a full float32
    checkpoint at step 2 and a model-only export at step 3. Once per session and variant:
    every test of the real peers shares it. Returns (model.json, reference logits)."""
    from tests.peers import titan_writer

    variant, export = request.param
    dump = tmp_path_factory.mktemp(f"titan_{variant}")
    info = titan_writer.write_checkpoints(dump, variant=variant, export_dtype=export)
    return info, titan_writer.load_reference(dump)


def write_older_layouts(info: dict, root: Path) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """The older layouts (nested with freqs_cis, flat Meta names, qkv_linear with output, fused
    wqkv), which today's torchtitan cannot write: torchtitan's saved weights of a ``titan_run``
    written in each by demo.writer (two FSDP2 ranks, each era's keys), one checkpoint folder
    each. Returns checkpoint folder -> (its layout, the weights as written)."""
    from tests.peers import titan_writer, tune_loader

    keys = tune_loader.titan_model_keys(info)
    saved = titan_writer.read_saved_model_weights(info["step_dirs"]["step-2"], keys)
    shape = demo.ModelShape(
        dim=info["dim"],
        n_layers=info["n_layers"],
        n_heads=info["n_heads"],
        n_kv_heads=info["n_kv_heads"],
        vocab_size=info["vocab_size"],
        hidden_dim=info["hidden_dim"],
        tied_embeddings=info["tied"],
    )
    meta = tune_loader.titan_to_meta(saved)
    older = [layout for layout in demo.LAYOUTS if layout != demo.TORCHTITAN_0_3]
    dirs = [str(root / f"layout{i}" / "checkpoint") for i in range(len(older))]
    written = demo.write_steps(
        [
            (f"{d}/step-7", meta, shape, {"layout": layout, "kind": "full"})
            for d, layout in zip(dirs, older, strict=True)
        ]
    )
    return dict(zip(dirs, zip(older, written, strict=True), strict=True))


SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")


def make_tokenizer(folder: Path, vocab_size: int) -> dict[str, int]:
    """A real Hugging Face tokenizer folder (``tokenizer.json`` built with the tokenizers
    library, ``tokenizer_config.json``) of ``vocab_size - 5`` words and three special tokens,
    as torchtitan's hf_assets_path holds one; returns the special tokens' ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    words = {f"w{i}": i for i in range(vocab_size - 5)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(folder / "tokenizer.json"))
    bos, eos, pad = SPECIAL_TOKENS
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "model_max_length": 131072,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    first = len(words)
    return {"bos_token_id": first, "eos_token_id": first + 1, "pad_token_id": first + 2}


DEMO_EXPERIMENTS = ("debug", "500M", "debug_pretrained")


@pytest.fixture(scope="session")
def demo_checkpoints(tmp_path_factory) -> tuple[Path, dict]:
    """The demo's checkpoints as ``python -m demo --skip-full 500M`` writes them (a full and a
    weights-only save of debug and debug_pretrained, the 500M weights-only save), once per
    test session: ``(folder of checkpoint_<name>/, the weights each save holds)``."""
    root = tmp_path_factory.mktemp("demo_checkpoints")
    saved = experiments.write_demo(root, DEMO_EXPERIMENTS, skip_full=("500M",))
    return root, saved


def demo_workdir(demo_checkpoints: tuple[Path, dict], folder: Path) -> Path:
    """``folder`` laid out as ``make demo`` leaves it (``outputs/checkpoint_<name>/step-<N>``),
    its step folders links to the session's checkpoints: each test converts into a folder of
    its own, and none changes the shared saves."""
    root, _ = demo_checkpoints
    for checkpoint in root.iterdir():
        mine = folder / "outputs" / checkpoint.name
        mine.mkdir(parents=True)
        for step in checkpoint.iterdir():
            (mine / step.name).symlink_to(step, target_is_directory=True)
    return folder


def latest_step(checkpoint: Path) -> Path:
    """The newest ``step-<N>`` folder of a checkpoint folder."""
    return max(checkpoint.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
