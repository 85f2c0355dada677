"""Hugging Face folders as transformers 5.24 loads them, and the folder torchtitan's own export
makes, to hold a conversion to.

* :func:`hf_logits`: ``AutoModelForCausalLM.from_pretrained(folder)`` in float32, as a user
  loads it (no missing or unexpected keys allowed), and its logits on fixed tokens;
* :func:`hf_tensors`: every tensor of the folder's ``*.safetensors`` files;
* :func:`titan_to_hf`, :func:`titan_hf_folder`: torchtitan's ``Qwen3StateDictAdapter.to_hf`` of
  a torchtitan 0.3.0 state dict, and that saved with safetensors beside a given
  ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(path))
    return out


@torch.no_grad()
def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    """float32 logits of the model in ``folder`` on ``tokens``, loaded as a user loads it."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if problems:
        raise AssertionError(f"{folder} does not load cleanly: {problems}")
    return model.eval()(tokens).logits.float()


def titan_to_hf(model_config: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchtitan's own offline export of ``state`` (0.3.0 keys; ``model_config`` its
    torchtitan config), each tensor contiguous (to_hf's experts are views of the stacks)."""
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    hf = Qwen3StateDictAdapter(model_config, None).to_hf(dict(state))
    return {k: v.contiguous() for k, v in hf.items()}


def titan_hf_folder(
    folder: Path, model_config: Any, state: dict[str, torch.Tensor], config_json: dict
) -> Path:
    """:func:`titan_to_hf` of ``state`` as ``folder/model.safetensors``, with
    ``config_json``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(titan_to_hf(model_config, state), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    return folder
