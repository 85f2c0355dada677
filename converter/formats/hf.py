"""``output_format=hf``: a Hugging Face folder, as transformers' ``save_pretrained`` writes one.

- the weights in safetensors files of at most ``max_shard_size`` each, split as Hugging Face
  splits them: ``model.safetensors`` when one suffices, otherwise ``model-0000i-of-0000N``
  files and ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``);
- ``config.json`` for the family (``LlamaForCausalLM``), ``generation_config.json``, the
  tokenizer files of ``experiment.tokenizer_dir``, and a torchtune recipe snippet for
  ``FullModelHFCheckpointer``;
- the family's ``hf`` naming, which reorders the q and k rows per head from torchtitan's
  interleaved RoPE to Hugging Face's halves, and no ``lm_head.weight`` with tied embeddings.

transformers, torchtune's ``FullModelHFCheckpointer`` and torchtitan's own
``HuggingFaceStorageReader`` load the folder as it is.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from converter.formats import hf_assets, safetensors_file
from converter.formats.base import Described, FormatConfig, OutputFormat
from converter.formats.recipe import torchtune_recipe
from converter.plan import OutputTensor, Plan

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
RECIPE = "titan2tune.torchtune.yaml"
_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B)?\s*$", re.IGNORECASE)
# Paths a folder output is not: a one-file output's name, given by mistake.
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json")
_TORCHTUNE_CHECKPOINTER = "torchtune.training.FullModelHFCheckpointer"


def shard_bytes(size: str) -> int:
    """``max_shard_size`` in bytes: a number of bytes, or with a unit, ``5GB`` as Hugging Face
    reads it (KB, MB, GB, TB are powers of 10), or ``4GiB`` (powers of 2)."""
    m = _SIZE.match(size)
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]) if m else 0
    if value <= 0:
        raise ValueError(
            f"output_format.max_shard_size={size!r} is not a size: give bytes (5000000000) or "
            "a number with KB, MB, GB, TB (powers of 10, as Hugging Face) or KiB, MiB, GiB"
        )
    return value


@dataclass
class HfOptions(FormatConfig):
    name: str = "hf"
    output_name: str = field(
        default="final_model_hf",
        metadata={
            "help": "the folder's name in the checkpoint folder, if experiment.output is not set"
        },
    )
    max_shard_size: str = field(
        default="5GB",
        metadata={"help": "the largest safetensors file: bytes, or 5GB (powers of 10) or 4GiB"},
    )

    def check(self) -> None:
        shard_bytes(self.max_shard_size)


class HfFormat(OutputFormat):
    name = "hf"
    options = HfOptions
    naming = "hf"
    # transformers ties lm_head to the embeddings itself (tie_word_embeddings), and its own
    # save_pretrained leaves the key out; torchtune's tied llama3_2 refuses it in a strict load.
    keeps_tied_head = False
    folder = True
    reads_back_with = ("safetensors",)

    def loads_with(self, described: Described) -> str:
        loaders = ["transformers.AutoModelForCausalLM.from_pretrained(folder)"]
        if _torchtune_builds(described):
            loaders.append(_TORCHTUNE_CHECKPOINTER)
        return "; ".join(loaders)

    def check_output(self, output: str) -> None:
        if output.rstrip("/").endswith(_FILE_SUFFIXES):
            raise ValueError(
                f"experiment.output must be a folder for output_format=hf, got {output!r} (a "
                "file name); the default is <checkpoint_dir>/final_model_hf"
            )

    def files(self, plan: Plan, options: Any) -> dict[str, list[OutputTensor]]:
        """Hugging Face's split (huggingface_hub's ``split_torch_state_dict_into_shards``, which
        transformers uses): the tensors, in the model's order, fill a shard until the next
        would take it past ``max_shard_size``; a tensor larger than that is a shard of its own,
        numbered where it comes, while the shard being filled stays open."""
        limit = shard_bytes(options.max_shard_size)
        shards: list[list[OutputTensor]] = []
        current: list[OutputTensor] = []
        size = 0
        for tensor in plan.tensors:
            n = safetensors_file.nbytes(tensor)
            if n > limit:
                shards.append([tensor])
                continue
            if size + n > limit:
                shards.append(current)
                current, size = [], 0
            current.append(tensor)
            size += n
        if current:
            shards.append(current)
        if len(shards) == 1:
            return {SINGLE: safetensors_file.save_file_order(shards[0])}
        count = len(shards)
        return {
            f"model-{i:05d}-of-{count:05d}.safetensors": safetensors_file.save_file_order(shard)
            for i, shard in enumerate(shards, start=1)
        }

    def create(self, path: Path, tensors: list[OutputTensor]) -> dict[str, int]:
        return safetensors_file.create(path, tensors)

    def read_back(self, path: Path, tensors: list[OutputTensor]) -> dict[str, int]:
        return safetensors_file.read_back(path, tensors)

    def assets(self, tokenizer_dir: Path | None, arch: Any) -> dict[str, Path]:
        if tokenizer_dir is None:
            return {}
        return hf_assets.find_assets(tokenizer_dir, arch.vocab_size)

    def reads_from_assets(self, tokenizer_dir: Path | None) -> dict[str, Path]:
        return hf_assets.read_not_copied(tokenizer_dir)

    def describe(self, d: Described) -> dict[str, str | Path]:
        shards = self.files(d.plan, d.options)
        ids = hf_assets.token_ids(d.tokenizer_dir, d.assets)
        described: dict[str, str | Path] = {CONFIG: _json(self.config(d, ids))}
        if hf_assets.GENERATION_CONFIG not in d.assets:
            described[hf_assets.GENERATION_CONFIG] = hf_assets.generation_config(ids)
        if len(shards) > 1:
            described[INDEX] = _json(_index(shards))
        if _torchtune_builds(d):
            output_dir = d.output.with_name(f"{d.output.name}_torchtune")
            described[RECIPE] = torchtune_recipe(
                d, _TORCHTUNE_CHECKPOINTER, d.output, list(shards), output_dir
            )
        return {**described, **d.assets}

    def config(self, d: Described, ids: hf_assets.TokenIds) -> dict[str, Any]:
        """The family's ``config.json``, with the weights' dtype and the special token ids.

        The dtype is written under transformers 5's name (``dtype``) and its older one
        (``torch_dtype``): ``from_pretrained`` loads every weight in it by default. Weights
        kept in several dtypes (``export_dtype=keep``) get one that holds each of them
        exactly: float32 holds bfloat16 and float16."""
        floating = {t.dtype for t in d.plan.tensors if t.dtype.is_floating_point}
        if len(floating) > 1:
            floating = {max(floating | {torch.float32}, key=lambda t: t.itemsize)}
        dtype = str(floating.pop()).removeprefix("torch.") if floating else None
        config = d.family.hf_config(d.arch)
        return {**config, **ids, "dtype": dtype, "torch_dtype": dtype}

    def missing(self, d: Described) -> list[str]:
        if d.assets:
            # No bos is a choice (Qwen's tokenizers have none); no eos is not.
            if hf_assets.token_ids(d.tokenizer_dir, d.assets)["eos_token_id"] is not None:
                return []
            return [
                f"eos_token_id null in {d.output / CONFIG} and {hf_assets.GENERATION_CONFIG}: "
                f"{d.tokenizer_dir} names no end-of-sequence token (in a config.json, "
                "generation_config.json, or tokenizer_config.json with tokenizer.json), and "
                "without one generation stops only at max_new_tokens. Set it in both files, or "
                "copy the tokenizer_config.json of the run's hf_assets_path into "
                "experiment.tokenizer_dir and convert again."
            ]
        return [
            f"no tokenizer files in {d.output}: experiment.tokenizer_dir is not set. Copy the "
            "tokenizer files of the run's hf_assets_path (tokenizer.json, "
            "tokenizer_config.json, and any of special_tokens_map.json, tokenizer.model, "
            "original/tokenizer.model) into it, and set bos_token_id and eos_token_id in its "
            "config.json and generation_config.json; or convert again with "
            "experiment.tokenizer_dir=<hf_assets_path>."
        ]


def _index(shards: dict[str, list[OutputTensor]]) -> dict[str, Any]:
    """``model.safetensors.index.json`` as transformers 5 writes it; ``total_size`` is the
    tensors' bytes, not the files' sizes."""
    tensors = [t for shard in shards.values() for t in shard]
    return {
        "metadata": {
            "total_parameters": sum(math.prod(t.shape) for t in tensors),
            "total_size": sum(safetensors_file.nbytes(t) for t in tensors),
        },
        "weight_map": {t.name: name for name, shard in shards.items() for t in shard},
    }


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def _torchtune_builds(d: Described) -> bool:
    """Whether torchtune has a builder of the model, so that its HF checkpointer loads it."""
    return d.family.torchtune_model(d.arch) is not None
