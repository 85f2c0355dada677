"""What a user does today to make a Hugging Face checkpoint of a torchtitan DCP save: load the
DCP into a state dict, torchtitan's own ``Llama3StateDictAdapter.to_hf``, a cast to the export
dtype, ``safetensors.torch.save_file`` (as torchtitan's scripts/checkpoint_conversion does, with
safetensors' own writer in place of DCP's Hugging Face writer: one file, metadata
``{"format": "pt"}``, the bytes titan2tune writes for the same tensors).

    python benchmarks/hf_baseline.py STEP_DIR OUT_FOLDER --dim D --n-layers L --n-heads H \
        --n-kv-heads K --vocab-size V --hidden-dim F [--tied] [--export-dtype bfloat16]

Only the model's entries are loaded (empty tensors of the saved sizes, filled by ``dcp.load``),
which is the least a state-dict conversion can hold in memory: the whole model, and its cast.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

TRAINING_STATE = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def model_config(args: argparse.Namespace):
    """torchtitan's ``Llama3Model.Config`` of these dimensions (what ``to_hf`` reads: the head
    counts and weight tying), built with torchtitan's own helpers."""
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers

    return Llama3Model.Config(
        dim=args.dim,
        vocab_size=args.vocab_size,
        enable_weight_tying=args.tied,
        tok_embeddings=Embedding.Config(num_embeddings=args.vocab_size, embedding_dim=args.dim),
        norm=RMSNorm.Config(normalized_shape=args.dim),
        lm_head=Linear.Config(in_features=args.dim, out_features=args.vocab_size),
        layers=_build_llama3_layers(
            n_layers=args.n_layers,
            dim=args.dim,
            n_heads=args.n_heads,
            n_kv_heads=args.n_kv_heads,
            hidden_dim=args.hidden_dim,
            rope=ComplexRoPE.Config(
                dim=args.dim // args.n_heads, max_seq_len=131072, theta=500000, scaling="llama"
            ),
            attn_backend="flex",
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step_dir", type=Path)
    parser.add_argument("out", type=Path)
    for name in ("dim", "n-layers", "n-heads", "n-kv-heads", "vocab-size", "hidden-dim"):
        parser.add_argument(f"--{name}", type=int, required=True)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--export-dtype", default="bfloat16")
    args = parser.parse_args()

    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    metadata = FileSystemReader(str(args.step_dir)).read_metadata().state_dict_metadata
    state_dict = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.items()
        if isinstance(md, TensorStorageMetadata) and key.split(".")[0] not in TRAINING_STATE
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state_dict, checkpoint_id=str(args.step_dir), no_dist=True)
    hf = Llama3StateDictAdapter(model_config(args), None).to_hf(state_dict)
    dtype = getattr(torch, args.export_dtype)
    hf = {k: v.to(dtype) for k, v in hf.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(hf, args.out / "model.safetensors", metadata={"format": "pt"})


if __name__ == "__main__":
    main()
