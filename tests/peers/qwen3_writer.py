"""Real qwen3 checkpoints from torchtitan 0.3.0's own CheckpointManager, and the same weights
saved in the older qwen3 layouts.

:func:`write_checkpoints` runs ``titan_writer``'s training job with :class:`Qwen3Hooks`: two
gloo CPU ranks, the model built on the meta device and sharded by torchtitan's
``apply_fsdp_to_decoder`` (stacked experts ``[E, ...]`` sharded on dim 0), AdamW through
torchtitan's containers, and torchtitan's ``CheckpointManager``, which saves a full float32
checkpoint at step 2 and the model alone, in ``export_dtype``, at step 3. Beside it,
``model.json`` and ``reference.pt`` hold the model's dimensions and torchtitan's own logits on
fixed tokens, for every step (``titan_writer.load_reference``). torchtitan runs the experts in
bfloat16 through ``torch._grouped_mm`` even with float32 weights, so its MoE logits are what a
float32 Hugging Face model computes only up to bfloat16 rounding.

Variants (torchtitan's own config builders; all but ``debugmodel_moe_16`` write in seconds):

* ``dense_tied``: 2 layers, dim 64, 4 query heads over 2 key/value heads of 32 (not
  64 / 4 = 16), FFN 160, vocab 128, tied embeddings;
* ``moe``: the same attention, 16 experts of width 48 in both layers, top-4, untied;
* ``moe_mixed``: a MoE layer, then a dense one (torchtitan picks per layer; Hugging Face's
  ``mlp_only_layers``);
* ``moe_wide``: as ``moe`` with 64 experts of width 512: each stacked expert tensor is 8 MiB
  in float32, larger than the smallest ``batch_mb`` many times over;
* ``debugmodel_moe_16``: torchtitan's ``debugmodel_moe`` with its 8 layers built twice over
  (their init scaled for 8), 16 layers, 2.5 GB in float32: the benchmark's MoE input;
* any flavor torchtitan registers (``debugmodel``, ``debugmodel_moe``, ...): the MoE
  debugmodel's full checkpoint is 3.6 GB and takes minutes.

``expert_bias`` (MoE):

* ``"zero"``: as qwen3 trained before torchtitan #3666 (2026-06-14), whose optimizer had no
  load-balancing hook: ``expert_bias_E`` is saved, all zeros.
* ``"trained"``: torchtitan's ``register_moe_load_balancing_hook`` (qwen3's
  ``post_optimizer_build_fn`` since #3666) updates it before every optimizer step from the
  tokens each expert got in a forward pass in training mode (forward only: flex attention has
  no CPU backward, so the gradients are set by hand as in ``titan_writer``).

``eras``: after every save, each rank also saves what torchtitan just saved with the keys of
each older layout (:data:`ERAS`, from torchtitan's history), to
``<dump>/eras/<slug>/checkpoint/step-N`` with DCP, the parameters sharded on dim 0 over the two
ranks as FSDP2 shards them, the optimizer state renamed alike. The weights are torchtitan's, so
its reference logits hold for every layout.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from tests.peers import titan_writer

VARIANTS = ("dense_tied", "moe", "moe_mixed", "moe_wide")
# The benchmark's MoE input (benchmarks/inputs.py): 2.5 GB, no variant for a test.
MOE_16 = "debugmodel_moe_16"
EXPERT_BIAS = ("zero", "trained")
# The tiny variants' sizes.
_DIM, _LAYERS, _HEADS, _KV_HEADS, _HEAD_DIM, _VOCAB = 64, 2, 4, 2, 32, 128
_HIDDEN, _EXPERTS, _TOP_K, _MOE_HIDDEN = 160, 16, 4, 48
# moe_wide: stacked expert tensors of 8 MiB each in float32, eight times a 1 MB batch_mb.
_WIDE_EXPERTS, _WIDE_MOE_HIDDEN = 64, 512
_THETA, _MAX_SEQ_LEN = 1000000.0, 256


@dataclasses.dataclass(frozen=True)
class EraKeys:
    """How qwen3's keys were named from one torchtitan PR on, as renames of 0.3.0's."""

    name: str
    # "meta": attention.wq|wk|wv (v0.2.2); "qkv_linear": attention.qkv_linear.wq|wk|wv (#2878);
    # "fused": the fused attention.qkv_linear.wqkv parameter, saved as is until #3656
    # (70dd94551, 2026-06-19) added the hooks that save it split.
    qkv: str
    # "output" until #2937 (786e26f8e, "ChunkedCELoss", 2026-04-27) renamed it "lm_head".
    head: str
    # "plain": moe.experts.w1|w2|w3 and moe.expert_bias (v0.2.2); "suffixed":
    # moe.experts.w1_EFD|w2_EDF|w3_EFD and moe.expert_bias_E from #3425 (200100e7d,
    # 2026-05-27); since #3859 (3101b42f9, 2026-07-16) under moe.routed_experts.inner_experts.
    experts: str

    @property
    def slug(self) -> str:
        return self.name.replace("#", "").replace(" ", "_")


ERAS = {
    era.name: era
    for era in (
        EraKeys("#3425", qkv="qkv_linear", head="lm_head", experts="suffixed"),
        EraKeys("#3425 fuse_qkv", qkv="fused", head="lm_head", experts="suffixed"),
        EraKeys("#2937", qkv="qkv_linear", head="lm_head", experts="plain"),
        EraKeys("#2937 fuse_qkv", qkv="fused", head="lm_head", experts="plain"),
        EraKeys("#2878", qkv="qkv_linear", head="output", experts="plain"),
        EraKeys("#2878 fuse_qkv", qkv="fused", head="output", experts="plain"),
        # Qwen3 in torchtitan's core from #1860 (d880de214, 2025-10-12) to v0.2.2.
        EraKeys("v0.2.2", qkv="meta", head="output", experts="plain"),
    )
}
_FUSED_KEY = re.compile(r"^(.*\.attention\.qkv_linear\.)wqkv\.weight(.*)$")


def era_key(key: str, era: EraKeys) -> str:
    """A torchtitan 0.3.0 model key, or an optimizer key naming one, as ``era`` named it (the
    fused QKV weight aside: see :func:`era_state`)."""
    key = key.replace(".moe.routed_experts.inner_experts.", ".moe.experts.")
    if era.experts == "plain":
        key = re.sub(r"\.moe\.experts\.(w[123])_E[DF][DF]\b", r".moe.experts.\1", key)
        key = re.sub(r"\.moe\.expert_bias_E\b", ".moe.expert_bias", key)
    if era.qkv == "meta":
        key = key.replace(".attention.qkv_linear.", ".attention.")
    if era.head == "output":
        key = re.sub(r"(^|\.)lm_head\.", r"\1output.", key)
    return key


def era_state(
    model: dict[str, Any], optimizer: dict[str, Any], era: EraKeys, qkv_modules: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and optimizer state dicts that torchtitan 0.3.0 saved, as ``era`` saved them.

    torchtitan's own ``FusedQKVLinear`` hooks fuse and split the QKV weights
    (``qkv_modules``: each layer's ``attention.qkv_linear.`` prefix -> its module): a fused era
    saves the ``wqkv`` parameter; before #3656 a non-fused model's optimizer held ``wq``,
    ``wk`` and ``wv``. Parameters gathered by the save hook are sharded on dim 0 again, as
    FSDP2 shards a parameter; buffers (``expert_bias``) stay whole, as FSDP2 leaves them."""
    from torchtitan.models.common.attention import FusedQKVLinear

    model = dict(model)
    if era.qkv == "fused":
        for prefix, module in qkv_modules.items():
            FusedQKVLinear._merge_qkv_on_load(module, model, prefix)
    optimizer = dict(optimizer) if era.qkv == "fused" else _split_fused(optimizer, qkv_modules)
    return (
        {era_key(k, era): _fsdp_sharded(v) for k, v in model.items()},
        {era_key(k, era): _fsdp_sharded(v) for k, v in optimizer.items()},
    )


def _split_fused(state: dict[str, Any], qkv_modules: dict[str, Any]) -> dict[str, Any]:
    """Optimizer entries of a fused ``wqkv`` as the three ``wq``/``wk``/``wv`` entries a
    non-fused model had: its moments split by torchtitan's save hook, the rest repeated."""
    from torchtitan.models.common.attention import FusedQKVLinear

    out: dict[str, Any] = {}
    for key, value in state.items():
        match = _FUSED_KEY.match(key.removeprefix("state.").removeprefix("param_groups."))
        if not match:
            out[key] = value
            continue
        head = key[: len(key) - len(match.group(0))]
        prefix, tail = match.groups()
        module = qkv_modules[prefix]
        rows = module.wqkv.weight.shape[0]
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] == rows:
            split = {"wqkv.weight": value}
            FusedQKVLinear._split_qkv_on_save(module, split, "", None)
        else:
            split = {f"{w}.weight": value for w in ("wq", "wk", "wv")}
        for name, part in split.items():
            out[f"{head}{prefix}{name}{tail}"] = part
    return out


def _fsdp_sharded(value: Any) -> Any:
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(value, DTensor) and value.dim() > 0:
        return value.redistribute(value.device_mesh, [Shard(0)])
    return value


# --------------------------------------------------------------------------------------------
# The variants
# --------------------------------------------------------------------------------------------


def model_config(variant: str, attn_backend: str = "flex"):
    """The torchtitan ``Qwen3Model.Config`` of a variant (see the module docstring)."""
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.qwen3 import (
        _EMBEDDING_INIT,
        _EMBEDDING_SKIP_INIT,
        _LINEAR_INIT,
        Qwen3Model,
        _build_qwen3_layers,
        _build_qwen3_moe_layers,
        _qwen3_norm,
        qwen3_configs,
    )

    if variant in qwen3_configs:
        return qwen3_configs[variant](attn_backend=attn_backend)
    if variant == MOE_16:
        cfg = qwen3_configs["debugmodel_moe"](attn_backend=attn_backend)
        return dataclasses.replace(cfg, layers=[*cfg.layers, *copy.deepcopy(cfg.layers)])
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown variant {variant!r}; choose from {VARIANTS}, {MOE_16!r} or {qwen3_configs}"
        )
    attention = dict(
        n_layers=_LAYERS,
        dim=_DIM,
        n_heads=_HEADS,
        n_kv_heads=_KV_HEADS,
        head_dim=_HEAD_DIM,
        attn_backend=attn_backend,
        rope=CosSinRoPE.Config(dim=_HEAD_DIM, max_seq_len=_MAX_SEQ_LEN, theta=_THETA),
    )
    dense = _build_qwen3_layers(hidden_dim=_HIDDEN, **attention)
    moe = _build_qwen3_moe_layers(
        moe_hidden_dim=_MOE_HIDDEN,
        num_experts=_EXPERTS,
        top_k=_TOP_K,
        moe_comm_backend="standard",
        **attention,
    )
    wide = _build_qwen3_moe_layers(
        moe_hidden_dim=_WIDE_MOE_HIDDEN,
        num_experts=_WIDE_EXPERTS,
        top_k=_TOP_K,
        moe_comm_backend="standard",
        **attention,
    )
    layers = {"dense_tied": dense, "moe": moe, "moe_mixed": [moe[0], dense[1]], "moe_wide": wide}
    layers = layers[variant]
    tied = variant == "dense_tied"
    return Qwen3Model.Config(
        vocab_size=_VOCAB,
        dim=_DIM,
        norm=_qwen3_norm(_DIM),
        enable_weight_tying=tied,
        tok_embeddings=Embedding.Config(
            num_embeddings=_VOCAB,
            embedding_dim=_DIM,
            param_init=_EMBEDDING_SKIP_INIT if tied else _EMBEDDING_INIT,
        ),
        lm_head=Linear.Config(in_features=_DIM, out_features=_VOCAB, param_init=_LINEAR_INIT),
        layers=layers,
    )


def model_dims(cfg) -> dict[str, Any]:
    """The dimensions of a torchtitan ``Qwen3Model.Config`` as plain JSON values: dim,
    n_layers, n_heads, n_kv_heads, head_dim, vocab_size, hidden_dim (None if no layer is
    dense), n_experts, top_k, moe_hidden_dim, route_norm, score_func (None if no layer is
    MoE), dense_layers (of a MoE model), norm_eps, rope_theta, max_seq_len, tied, fused_qkv."""
    from torchtitan.models.common.attention import FusedQKVLinear

    layers = cfg.layers
    attention = layers[0].attention
    dense = [i for i, layer in enumerate(layers) if layer.moe is None]
    moe = next((layer.moe for layer in layers if layer.moe is not None), None)
    norms = [(layer.attention_norm, layer.ffn_norm, layer.attention.qk_norm) for layer in layers]
    eps = {cfg.norm.eps} | {norm.eps for block in norms for norm in block}
    if len(eps) != 1:
        raise ValueError(f"mixed RMSNorm eps in one model: {sorted(eps)}")
    return {
        "dim": cfg.dim,
        "n_layers": len(layers),
        "n_heads": attention.n_heads,
        "n_kv_heads": attention.n_kv_heads,
        "head_dim": attention.head_dim,
        "vocab_size": cfg.vocab_size,
        "hidden_dim": layers[dense[0]].feed_forward.w1.out_features if dense else None,
        "n_experts": moe.num_experts if moe else None,
        "top_k": moe.router.top_k if moe else None,
        "moe_hidden_dim": moe.routed_experts.inner_experts.hidden_dim if moe else None,
        "route_norm": moe.router.route_norm if moe else None,
        "score_func": moe.router.score_func if moe else None,
        "dense_layers": dense if moe else [],
        "norm_eps": eps.pop(),
        "rope_theta": float(attention.rope.theta),
        "max_seq_len": int(attention.rope.max_seq_len),
        "tied": bool(cfg.enable_weight_tying),
        "fused_qkv": isinstance(attention.qkv_linear, FusedQKVLinear.Config),
    }


# --------------------------------------------------------------------------------------------
# The hooks into titan_writer's training job
# --------------------------------------------------------------------------------------------


class Qwen3Hooks(titan_writer.ModelHooks):
    """qwen3's part of the training job: the variant's config, the expert bias and the older
    layouts' saves (``job.options``: ``expert_bias``, ``eras``)."""

    def config(self):
        return model_config(self.job.variant)

    def dims(self, cfg) -> dict[str, Any]:
        return model_dims(cfg)

    def after_build(self, model, optimizers, mesh) -> None:
        self.model = model
        if self.job.options.get("expert_bias", "zero") != "trained":
            return
        from torchtitan.components.optimizer import register_moe_load_balancing_hook
        from torchtitan.distributed import ParallelDims

        # torchtitan builds its meshes on an accelerator; on CPU the one FSDP mesh of the
        # two ranks is also the mesh its loss (and the token counts) are reduced over.
        dims = ParallelDims(
            dp_replicate=1,
            dp_shard=titan_writer.WORLD_SIZE,
            cp=1,
            tp=1,
            pp=1,
            ep=1,
            world_size=titan_writer.WORLD_SIZE,
            spmd_backend="partial_dtensor",
        )
        dims._single_axis_meshes["loss"] = mesh
        register_moe_load_balancing_hook(optimizers, [model], dims)

    def before_step(self, model, step: int, inputs: dict[str, torch.Tensor]) -> None:
        """With a trained bias: a forward pass in training mode, which counts the tokens each
        expert gets, for the load-balancing hook of the optimizer step."""
        if self.job.options.get("expert_bias", "zero") != "trained":
            return
        tokens = inputs["input"]
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
        with torch.no_grad(), titan_writer._flex_attention_mode(compiled=False):
            masks = model.get_attention_masks(positions=positions)
            model(tokens, positions=positions, attention_masks=masks)

    def after_save(self, step: int, checkpointer, last: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torchtitan.components.checkpoint import MODEL, OPTIMIZER

        eras = [ERAS[name] for name in self.job.options.get("eras", ())]
        if not eras:
            return
        qkv_modules = {
            f"layers.{i}.attention.qkv_linear.": block.attention.qkv_linear
            for i, block in self.model.layers.items()
        }
        model_only = last and checkpointer.last_save_model_only
        model_sd = checkpointer.states[MODEL].state_dict()
        if model_only:  # as CheckpointManager._save_last_step casts it
            export = checkpointer.export_dtype
            model_sd = {
                k: v.to(export) if v.is_floating_point() and v.dtype != export else v
                for k, v in model_sd.items()
            }
            optimizer_sd: dict[str, Any] = {}
        else:
            optimizer_sd = checkpointer.states[OPTIMIZER].state_dict()
        rest = {k: v for k, v in checkpointer.states.items() if k not in (MODEL, OPTIMIZER)}
        for era in eras:
            model_state, optimizer_state = era_state(model_sd, optimizer_sd, era, qkv_modules)
            state = model_state if model_only else {
                **model_state, OPTIMIZER: optimizer_state, **rest
            }  # fmt: skip
            folder = era_dir(self.job.dump, era) / f"step-{step}"
            dcp.save(state, checkpoint_id=str(folder))


def era_dir(dump: str | Path, era: EraKeys) -> Path:
    """The checkpoint folder of ``era``'s saves in a dump."""
    return Path(dump) / "eras" / era.slug / titan_writer.CHECKPOINT_FOLDER


def write_checkpoints(
    dump: str | Path,
    variant: str = "moe",
    export_dtype: str = "float32",
    expert_bias: str = "zero",
    eras: tuple[str, ...] = (),
    **options: Any,
) -> dict[str, Any]:
    """:func:`titan_writer.write_checkpoints` for qwen3: ``model.json``'s contents with
    ``dump``, ``reference``, ``step_dirs`` and, for each of ``eras``, its checkpoint folder in
    ``era_dirs``. ``options``: titan_writer's (``steps``, ``lr``, ...)."""
    if expert_bias not in EXPERT_BIAS:
        raise ValueError(f"expert_bias must be one of {EXPERT_BIAS}, got {expert_bias!r}")
    if unknown := set(eras) - set(ERAS):
        raise ValueError(f"unknown eras {sorted(unknown)}; choose from {list(ERAS)}")
    if eras and not model_dims(model_config(variant))["fused_qkv"]:
        raise ValueError(
            f"the older layouts are written from a model with a fused QKV (torchtitan's own "
            f"hooks fuse and split it), and {variant!r} has none"
        )
    info = titan_writer.write_checkpoints(
        dump,
        variant=variant,
        export_dtype=export_dtype,
        family="qwen3",
        options={"expert_bias": expert_bias, "eras": list(eras)},
        **options,
    )
    info["expert_bias"] = expert_bias
    info["era_dirs"] = {name: str(era_dir(info["dump"], ERAS[name])) for name in eras}
    return info
