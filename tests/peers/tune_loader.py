"""Load a converted ``.pt`` exactly as a torchtune 0.6.1 recipe does, and compute logits.

A recipe (``recipes/full_finetune_single_device.py``) does, in order::

    checkpointer = config.instantiate(cfg.checkpointer, should_load_recipe_state=False)
    ckpt = checkpointer.load_checkpoint()           # {"model": state dict, ...}
    with training.set_default_dtype(dtype), device:
        model = config.instantiate(cfg.model)
    model.load_state_dict(ckpt["model"])           # strict

The functions here do the same with the same classes:

* :func:`load_with_checkpointer` runs ``FullModelMetaCheckpointer`` (Meta keys, renamed by
  ``convert_weights.meta_to_tune``; ``model_type="LLAMA3_2"`` pops ``output.weight``, and
  raises ``KeyError`` when it is missing) or ``FullModelTorchTuneCheckpointer`` (torchtune
  keys, loaded as they are) and returns the ``"model"`` state dict;
* :func:`build_tune_model` builds the torchtune llama3 family model matching a torchtitan
  ``model.json`` (see ``titan_writer.model_dims``): ``llama3_1`` (untied, llama RoPE
  scaling), ``llama3_2`` (tied, llama RoPE scaling) or ``llama3`` (untied, no scaling);
* :func:`tune_logits` runs the forward (torchtune's causal SDPA, no mask) in float32 out;
* :func:`torchtune_yaml` / :func:`instantiate_from_yaml` write and read back the
  ``model:`` + ``checkpointer:`` YAML a recipe takes (``tests/peers/sample_torchtune.yaml``
  is the one for torchtitan's debugmodel);
* :func:`selfcheck` verifies the harness itself on a ``titan_writer`` dump, without our
  converter: it reads the DCP step folders, renames the keys by hand (Meta and torchtune
  style), saves ``.pt`` files, loads them through both checkpointers and compares logits
  with torchtitan's reference logits.

Command line: ``python tests/peers/tune_loader.py DUMP [--workdir DIR]`` runs
:func:`selfcheck` and prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CHECKPOINTERS = {
    "meta": "torchtune.training.FullModelMetaCheckpointer",
    "torchtune": "torchtune.training.FullModelTorchTuneCheckpointer",
}
FP32_TOLERANCE = 1e-4


def _dims(model_json: str | os.PathLike | dict) -> dict[str, Any]:
    if isinstance(model_json, dict):
        return model_json
    path = Path(model_json)
    if path.is_dir():
        path = path / "model.json"
    return json.loads(path.read_text())


def model_type_for(model_json) -> str:
    """torchtune ``ModelType`` name: ``LLAMA3_2`` for tied embeddings, else ``LLAMA3``."""
    return "LLAMA3_2" if _dims(model_json)["tied"] else "LLAMA3"


# --------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------


def _checkpointer_class(kind: str):
    from torchtune import training

    name = CHECKPOINTERS.get(kind, kind).rsplit(".", 1)[-1]
    if name not in ("FullModelMetaCheckpointer", "FullModelTorchTuneCheckpointer"):
        raise ValueError(f"unknown checkpointer kind {kind!r}; use one of {sorted(CHECKPOINTERS)}")
    return getattr(training, name)


def load_with_checkpointer(
    kind: str,
    ckpt_dir: str | os.PathLike,
    file: str,
    output_dir: str | os.PathLike,
    model_type: str,
) -> dict[str, torch.Tensor]:
    """Load ``ckpt_dir/file`` through a torchtune checkpointer; return the model state dict.

    ``kind``: "meta" (``FullModelMetaCheckpointer``) or "torchtune"
    (``FullModelTorchTuneCheckpointer``), or either class's dotted name. ``output_dir``
    must not be ``ckpt_dir`` or inside it (the checkpointers raise ValueError) and is
    created. ``model_type``: a ``torchtune.training.ModelType`` name, "LLAMA3" or
    "LLAMA3_2". Files are read with ``torch.load(mmap=True, weights_only=True)``.
    """
    cls = _checkpointer_class(kind)
    checkpointer = cls(
        checkpoint_dir=str(ckpt_dir),
        checkpoint_files=[file],
        model_type=model_type,
        output_dir=str(output_dir),
        should_load_recipe_state=False,
    )
    return checkpointer.load_checkpoint()["model"]


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def _int_if_integral(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def model_component(model_json) -> tuple[str, dict[str, Any]]:
    """The torchtune builder path and kwargs for a torchtitan ``model.json``.

    torchtune's ``Llama3ScaledRoPE`` fixes low/high freq factor 1/4 and original context
    8192 (the builders pass only ``scale_factor``), so other llama-scaling values raise.
    """
    d = _dims(model_json)
    if d["dim"] != d["n_heads"] * d["head_dim"]:
        raise ValueError("torchtune llama3 builders need head_dim == dim // n_heads")
    kwargs: dict[str, Any] = {
        "vocab_size": d["vocab_size"],
        "num_layers": d["n_layers"],
        "num_heads": d["n_heads"],
        "num_kv_heads": d["n_kv_heads"],
        "embed_dim": d["dim"],
        "max_seq_len": d["max_seq_len"],
        "intermediate_dim": d["hidden_dim"],
        "norm_eps": d["norm_eps"],
        "rope_base": _int_if_integral(d["rope_theta"]),
    }
    scaling = d["rope_scaling"]
    if scaling is None and d["tied"]:
        # The tied builder always scales; by a factor of 1 every frequency stays as it is.
        scaling = {"factor": 1, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        scaling["original_max_position_embeddings"] = 8192
    elif scaling is None:
        return "torchtune.models.llama3.llama3", kwargs
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    fixed["original_max_position_embeddings"] = 8192
    for key, want in fixed.items():
        if scaling[key] != want:
            raise NotImplementedError(f"torchtune's Llama3ScaledRoPE fixes {key}={want}")
    kwargs["scale_factor"] = _int_if_integral(scaling["factor"])
    if d["tied"]:
        kwargs["tie_word_embeddings"] = True
        return "torchtune.models.llama3_2.llama3_2", kwargs
    return "torchtune.models.llama3_1.llama3_1", kwargs


def _resolve(dotted: str):
    import importlib

    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def build_tune_model(model_json, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Build the matching torchtune model on CPU in ``dtype``, as a recipe does.

    ``model_json``: a dict from ``model.json``, its path, or the dump folder holding it.
    The parameters are created under ``torchtune.training.set_default_dtype(dtype)``; the
    RoPE cache stays float32 (torchtune computes it in float32 either way).
    """
    from torchtune import training

    component, kwargs = model_component(model_json)
    with training.set_default_dtype(dtype):
        model = _resolve(component)(**kwargs)
    return model.eval()


@torch.no_grad()
def tune_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """torchtune forward on ``tokens`` ([batch, seq] int64), logits as float32."""
    return model(tokens).float()


def load_tune_model(
    kind: str,
    ckpt_dir: str | os.PathLike,
    file: str,
    output_dir: str | os.PathLike,
    model_json,
    dtype: torch.dtype = torch.float32,
    model_type: str | None = None,
) -> torch.nn.Module:
    """Checkpointer load + model build + strict ``load_state_dict``, as in a recipe."""
    model_type = model_type or model_type_for(model_json)
    sd = load_with_checkpointer(kind, ckpt_dir, file, output_dir, model_type)
    model = build_tune_model(model_json, dtype)
    model.load_state_dict(sd, strict=True)
    return model


# --------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------


def torchtune_config(
    model_json,
    checkpoint_dir: str | os.PathLike,
    checkpoint_file: str,
    output_dir: str | os.PathLike,
    kind: str = "meta",
) -> dict[str, Any]:
    """The ``output_dir`` / ``model`` / ``checkpointer`` sections a recipe instantiates."""
    component, kwargs = model_component(model_json)
    return {
        "output_dir": str(output_dir),
        "model": {"_component_": component, **kwargs},
        "checkpointer": {
            "_component_": CHECKPOINTERS.get(kind, kind),
            "checkpoint_dir": str(checkpoint_dir),
            "checkpoint_files": [checkpoint_file],
            "recipe_checkpoint": None,
            "output_dir": "${output_dir}",
            "model_type": model_type_for(model_json),
        },
    }


def torchtune_yaml(*args, **kwargs) -> str:
    """:func:`torchtune_config` as YAML text (OmegaConf's dump)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(torchtune_config(*args, **kwargs)))


def instantiate_from_yaml(
    yaml_text_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Parse a recipe YAML and do what a recipe does with its checkpointer and model.

    Uses ``torchtune.config.instantiate`` on the ``checkpointer`` section (with
    ``should_load_recipe_state=False``, as recipes pass) and on the ``model`` section under
    ``set_default_dtype(dtype)``, then ``model.load_state_dict(ckpt["model"])`` (strict).
    """
    from omegaconf import OmegaConf
    from torchtune import config, training

    text = str(yaml_text_or_path)
    cfg = OmegaConf.load(text) if "\n" not in text and Path(text).is_file() else None
    if cfg is None:
        cfg = OmegaConf.create(text)
    checkpointer = config.instantiate(cfg.checkpointer, should_load_recipe_state=False)
    ckpt = checkpointer.load_checkpoint()
    with training.set_default_dtype(dtype):
        model = config.instantiate(cfg.model)
    model.load_state_dict(ckpt[training.MODEL_KEY])
    return model.eval()


# --------------------------------------------------------------------------------------
# Hand renaming (harness self-check only; the converter has its own)
# --------------------------------------------------------------------------------------


def titan_model_keys(model_json) -> list[str]:
    """The model keys a torchtitan 0.3.0 llama3 checkpoint holds (layout #2937)."""
    d = _dims(model_json)
    keys = ["tok_embeddings.weight", "norm.weight", "lm_head.weight"]
    for i in range(d["n_layers"]):
        p = f"layers.{i}."
        keys += [p + f"attention.qkv_linear.{w}.weight" for w in ("wq", "wk", "wv")]
        keys += [p + "attention.wo.weight", p + "attention_norm.weight", p + "ffn_norm.weight"]
        keys += [p + f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
    return keys


_TITAN_TO_META = [
    (
        r"^layers\.(\d+)\.attention\.qkv_linear\.(wq|wk|wv)\.weight$",
        r"layers.\1.attention.\2.weight",
    ),
    (r"^lm_head\.weight$", "output.weight"),
]
_META_TO_TUNE = [
    (r"^norm\.weight$", "norm.scale"),
    (r"^layers\.(\d+)\.attention\.wq\.weight$", r"layers.\1.attn.q_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wk\.weight$", r"layers.\1.attn.k_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wv\.weight$", r"layers.\1.attn.v_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wo\.weight$", r"layers.\1.attn.output_proj.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"layers.\1.sa_norm.scale"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"layers.\1.mlp_norm.scale"),
    (r"^layers\.(\d+)\.feed_forward\.(w1|w2|w3)\.weight$", r"layers.\1.mlp.\2.weight"),
]


def _rename(sd: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        out[new] = value
    return out


def titan_to_meta(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchtitan 0.3.0 model keys -> Meta keys (``wq/wk/wv``, ``output.weight``).

    A tied model keeps ``output.weight``: ``FullModelMetaCheckpointer`` with
    ``model_type=LLAMA3_2`` pops it and fails if it is absent.
    """
    return _rename(sd, _TITAN_TO_META)


def titan_to_tune(sd: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """torchtitan 0.3.0 model keys -> torchtune keys; a tied model drops ``output.weight``
    (torchtune's ``TiedLinear`` owns no parameter, so a strict load would reject it)."""
    out = _rename(titan_to_meta(sd), _META_TO_TUNE)
    if tied:
        out.pop("output.weight")
    return out


# --------------------------------------------------------------------------------------
# Self-check of the harness against torchtitan's reference logits
# --------------------------------------------------------------------------------------


def _titan_writer():
    try:
        from . import titan_writer
    except ImportError:  # run as a script or imported without its package
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import titan_writer
    return titan_writer


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def selfcheck(dump: str | os.PathLike, workdir: str | os.PathLike | None = None) -> dict:
    """Check the torchtune side of the harness on a ``titan_writer`` dump, by hand renames.

    For every step folder: read its model tensors with DCP (``no_dist``), write
    ``meta.pt`` (Meta keys) and ``tune.pt`` (torchtune keys) in the saved dtype, load each
    through its checkpointer into a float32 torchtune model and compare logits with
    torchtitan's logits of the same weights (``logits_saved``). A step saved in bfloat16
    is also run as a bfloat16 torchtune model (what a ``dtype: bf16`` recipe runs) and
    compared with the float32 reference. Returns a JSON-able report; ``ok`` is False if a
    float32-compute difference reaches ``FP32_TOLERANCE``.
    """
    read_saved_model_weights = _titan_writer().read_saved_model_weights

    dump = Path(dump)
    dims = _dims(dump)
    reference = torch.load(dump / "reference.pt", weights_only=True)
    tokens = reference["tokens"]
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    work = Path(workdir) if workdir is not None else Path(tmp.name)
    report: dict[str, Any] = {"dump": str(dump), "variant": dims.get("variant"), "steps": {}}
    ok = True
    try:
        for name, ref in reference["steps"].items():
            step_dir = dump / dims.get("checkpoint_folder", "checkpoint") / name
            titan_sd = read_saved_model_weights(step_dir, titan_model_keys(dims))
            files = {
                "meta": titan_to_meta(titan_sd),
                "torchtune": titan_to_tune(titan_sd, dims["tied"]),
            }
            ckpt_dir = work / name / "ckpt"
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            entry: dict[str, Any] = {
                "saved_dtype": ref["saved_dtype"],
                "titan_saved_vs_titan_fp32": _max_abs(ref["logits_saved"], ref["logits"]),
            }
            for kind, sd in files.items():
                file = f"{kind}.pt"
                torch.save(sd, ckpt_dir / file)
                out_dir = work / name / f"out-{kind}"
                begin = time.monotonic()
                model = load_tune_model(kind, ckpt_dir, file, out_dir, dims, torch.float32)
                logits = tune_logits(model, tokens)
                res = {
                    "fp32_compute_vs_titan_same_weights": _max_abs(logits, ref["logits_saved"]),
                    "fp32_compute_vs_titan_fp32": _max_abs(logits, ref["logits"]),
                    "seconds": round(time.monotonic() - begin, 2),
                }
                ok &= res["fp32_compute_vs_titan_same_weights"] < FP32_TOLERANCE
                if ref["saved_dtype"] == "bfloat16":
                    model = load_tune_model(kind, ckpt_dir, file, out_dir, dims, torch.bfloat16)
                    logits = tune_logits(model, tokens)
                    res["bf16_model_vs_titan_fp32"] = _max_abs(logits, ref["logits"])
                    res["bf16_model_vs_titan_same_weights"] = _max_abs(logits, ref["logits_saved"])
                entry[kind] = res
            # The YAML path: torchtune.config.instantiate on both sections.
            yaml_text = torchtune_yaml(dims, ckpt_dir, "meta.pt", work / name / "out-yaml")
            model = instantiate_from_yaml(yaml_text)
            entry["yaml_meta_fp32_vs_titan_same_weights"] = _max_abs(
                tune_logits(model, tokens), ref["logits_saved"]
            )
            ok &= entry["yaml_meta_fp32_vs_titan_same_weights"] < FP32_TOLERANCE
            report["steps"][name] = entry
    finally:
        if tmp is not None:
            tmp.cleanup()
    report["logits_abs_max"] = max(
        r["logits"].abs().max().item() for r in reference["steps"].values()
    )
    report["ok"] = bool(ok)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Self-check the torchtune side of the harness.")
    parser.add_argument("dump", help="a folder written by tests/peers/titan_writer.py")
    parser.add_argument("--workdir", help="keep the hand-renamed .pt files here")
    args = parser.parse_args(argv)
    begin = time.monotonic()
    report = selfcheck(args.dump, args.workdir)
    report["seconds"] = round(time.monotonic() - begin, 1)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
