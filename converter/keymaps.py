"""Key maps as plain data: one table per torchtitan layout generation and per output format.

Every map goes through one pivot naming, the Meta/torchtitan-original style
(``layers.{}.attention.wq.weight``, ``output.weight``), which torchtune's
FullModelMetaCheckpointer reads. ``{}`` stands for a layer index.

Sources (torchtitan commits, see ../shared/REFERENCE.md for the measured facts):
  G1  2024 .. mid-2025  nested ``model.`` prefix, ``model.freqs_cis`` buffer saved
  G2  Jul 2025 .. Apr 2026  model keys flattened to the top level
  G3  Apr 2026 .. Jun 2026  fused ``attention.qkv_linear.wqkv``, ``lm_head`` replaces ``output``
  G4  Jun 2026 .. now (torchtitan 0.3.0)  ``attention.qkv_linear.{wq,wk,wv}``, ``lm_head``
"""

from __future__ import annotations

# Marks a source weight that holds q, k and v fused; splitting needs the model's head counts.
FUSED_QKV = "<fused wq|wk|wv>"

# Per-layer weights in the pivot naming; a complete checkpoint has each of them for every layer.
PIVOT_LAYER_KEYS: tuple[str, ...] = (
    "layers.{}.attention.wq.weight",
    "layers.{}.attention.wk.weight",
    "layers.{}.attention.wv.weight",
    "layers.{}.attention.wo.weight",
    "layers.{}.attention_norm.weight",
    "layers.{}.ffn_norm.weight",
    "layers.{}.feed_forward.w1.weight",
    "layers.{}.feed_forward.w2.weight",
    "layers.{}.feed_forward.w3.weight",
)
PIVOT_GLOBAL_KEYS: tuple[str, ...] = ("tok_embeddings.weight", "norm.weight", "output.weight")
TIED_OUTPUT = "output.weight"  # the pivot key that tied embeddings make redundant
TIED_WITH = "tok_embeddings.weight"

_COMMON: dict[str, str] = {
    "tok_embeddings.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "layers.{}.attention.wo.weight": "layers.{}.attention.wo.weight",
    "layers.{}.attention_norm.weight": "layers.{}.attention_norm.weight",
    "layers.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "layers.{}.feed_forward.w1.weight": "layers.{}.feed_forward.w1.weight",
    "layers.{}.feed_forward.w2.weight": "layers.{}.feed_forward.w2.weight",
    "layers.{}.feed_forward.w3.weight": "layers.{}.feed_forward.w3.weight",
}

# Source model key -> pivot key, per layout generation.
_META_STYLE: dict[str, str] = {
    **_COMMON,
    "layers.{}.attention.wq.weight": "layers.{}.attention.wq.weight",
    "layers.{}.attention.wk.weight": "layers.{}.attention.wk.weight",
    "layers.{}.attention.wv.weight": "layers.{}.attention.wv.weight",
    "output.weight": "output.weight",
}
LAYOUTS: dict[str, dict[str, str]] = {
    "G1": _META_STYLE,
    "G2": _META_STYLE,
    "G3": {
        **_COMMON,
        "layers.{}.attention.qkv_linear.wqkv.weight": FUSED_QKV,
        "lm_head.weight": "output.weight",
    },
    "G4": {
        **_COMMON,
        "layers.{}.attention.qkv_linear.wq.weight": "layers.{}.attention.wq.weight",
        "layers.{}.attention.qkv_linear.wk.weight": "layers.{}.attention.wk.weight",
        "layers.{}.attention.qkv_linear.wv.weight": "layers.{}.attention.wv.weight",
        "lm_head.weight": "output.weight",
    },
}

# The prefix under which G1 nests the model state; later generations flatten it away.
G1_MODEL_PREFIX = "model."

# Top-level entries of a full (resumable) training checkpoint that are not model weights,
# and why each is left out of the output. Matched on the first dotted component only: optimizer
# keys contain model FQNs as substrings, so a loose pattern would mistake them for weights.
TRAINING_STATE: dict[str, str] = {
    "optimizer": "optimizer state (training only)",
    "lr_scheduler": "learning-rate scheduler state (training only)",
    "dataloader": "dataloader position (training only)",
    "train_state": "trainer step counters (training only)",
}

# Model buffers that torchtitan saved but that torchtune recomputes from the model config.
BUFFERS: dict[str, str] = {
    "freqs_cis": "RoPE frequency buffer (torchtune recomputes it)",
}

# Pivot key -> output key, per output format.
OUTPUT_FORMATS: dict[str, dict[str, str]] = {
    # torchtune.training.FullModelMetaCheckpointer maps these itself (convert_weights.meta_to_tune).
    "meta": {key: key for key in (*PIVOT_GLOBAL_KEYS, *PIVOT_LAYER_KEYS)},
    # torchtune.training.FullModelTorchTuneCheckpointer loads these as they are.
    "torchtune": {
        "tok_embeddings.weight": "tok_embeddings.weight",
        "norm.weight": "norm.scale",
        "output.weight": "output.weight",
        "layers.{}.attention.wq.weight": "layers.{}.attn.q_proj.weight",
        "layers.{}.attention.wk.weight": "layers.{}.attn.k_proj.weight",
        "layers.{}.attention.wv.weight": "layers.{}.attn.v_proj.weight",
        "layers.{}.attention.wo.weight": "layers.{}.attn.output_proj.weight",
        "layers.{}.attention_norm.weight": "layers.{}.sa_norm.scale",
        "layers.{}.ffn_norm.weight": "layers.{}.mlp_norm.scale",
        "layers.{}.feed_forward.w1.weight": "layers.{}.mlp.w1.weight",
        "layers.{}.feed_forward.w2.weight": "layers.{}.mlp.w2.weight",
        "layers.{}.feed_forward.w3.weight": "layers.{}.mlp.w3.weight",
    },
}

# Whether a model with tied embeddings keeps ``output.weight`` (a copy of the embeddings) in each
# format. FullModelMetaCheckpointer with model_type LLAMA3_2 pops output.weight and fails with a
# KeyError if it is absent; torchtune's tied llama3_2 model has no output.weight parameter, so a
# strict load of a torchtune-format file refuses it.
TIED_HEAD_KEPT: dict[str, bool] = {"meta": True, "torchtune": False}

# The torchtune checkpointer that reads each output format, for the emitted recipe snippet.
CHECKPOINTERS: dict[str, str] = {
    "meta": "torchtune.training.FullModelMetaCheckpointer",
    "torchtune": "torchtune.training.FullModelTorchTuneCheckpointer",
}
