"""Qwen3 as torchtitan trains it (``torchtitan/models/qwen3``): dense, and mixture-of-experts.

Canonical names are torchtitan 0.3.0's. Qwen3 came to torchtitan's core in #1860 (2025-10-12);
its layout eras, newest first (the MoE renames left a dense model's keys alone, so a dense
checkpoint is named by the newest era its keys fit):

- #3859 (2026-07-16, torchtitan 0.3.0): stacked experts under
  ``moe.routed_experts.inner_experts.{w1_EFD,w2_EDF,w3_EFD}``. Since #3656 (2026-06-19) a
  fused QKV is saved split by state-dict hooks, so no ``wqkv`` is saved from then on.
- #3425 (2026-05-27, "Use shape suffix for MoE"): ``moe.experts.{w1_EFD,w2_EDF,w3_EFD}`` and
  ``moe.expert_bias_E``, in the same orientation as before.
- #2937 (2026-04-27, "ChunkedCELoss"): ``output`` renamed ``lm_head``.
- #2878 (2026-04-16, "Fused QKV GQAttention"): ``attention.qkv_linear.{wq,wk,wv}``, or the
  fused ``qkv_linear.wqkv`` with ``fuse_qkv=True`` (torchtitan's ``debugmodel_fused_qkv``);
  each era up to #3656 has a fused twin.
- v0.2.2 (#1860 on): ``attention.{wq,wk,wv}``, ``output``, ``moe.experts.{w1,w2,w3}`` (no
  suffix, ``[E, F, D]`` / ``[E, D, F]`` / ``[E, F, D]``), ``moe.expert_bias``.

Hugging Face is the one output (torchtune 0.6.1 has no qwen3 builder). The naming is
torchtitan's ``Qwen3StateDictAdapter.to_hf`` as data: no row reordering, since torchtitan's
``CosSinRoPE`` rotates halves as Hugging Face does, and each stacked expert tensor split along
dim 0 into one tensor per expert, without a transpose. The attention head size is
``q_norm``'s, independent of ``dim / n_heads``; with it the shapes give every size the
config.json needs but the router's ``top_k``.

``expert_bias_E`` (auxiliary-loss-free load balancing) is added to the router's scores when
torchtitan picks each token's experts; Hugging Face's Qwen3-MoE has no such term. It was all
zeros in qwen3 checkpoints until #3666 (2026-06-14) hooked up its update. A zero bias is left
out; a non-zero one is an error unless ``accept_expert_bias`` says to leave it out anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from converter.errors import ConversionError
from converter.models.base import (
    Era,
    ModelConfig,
    ModelFamily,
    Source,
    Target,
    check_stated,
    positive,
)
from converter.models.common import WK, WQ, WQKV, WV, split_fused_qkv
from converter.plan import Dropped, Piece


@dataclass
class Qwen3Config(ModelConfig):
    """A torchtitan qwen3 model (``conf/experiment/model/qwen3/<flavor>.yaml``)."""

    family: str = "qwen3"
    n_heads: int | None = field(
        default=None, metadata={"help": "attention (query) heads; checked (the weights give it)"}
    )
    n_kv_heads: int | None = field(
        default=None, metadata={"help": "key/value heads; checked (the weights give it)"}
    )
    head_dim: int | None = field(
        default=None, metadata={"help": "per attention head; checked (q_norm's size)"}
    )
    hidden_dim: int | None = field(
        default=None,
        metadata={"help": "dense feed-forward width; checked (null in an all-MoE model)"},
    )
    n_experts: int | None = field(
        default=None, metadata={"help": "routed experts per MoE layer; checked (null: dense)"}
    )
    moe_hidden_dim: int | None = field(
        default=None, metadata={"help": "each expert's feed-forward width; checked"}
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "experts each token is routed to; required for MoE (not in the weights)"},
    )
    route_norm: bool = field(
        default=True,
        metadata={"help": "the router renormalises the top-k scores (HF's norm_topk_prob)"},
    )
    dense_layers: list[int] | None = field(
        default=None,
        metadata={"help": "the layers of a MoE model with a dense feed-forward; checked"},
    )
    accept_expert_bias: bool = field(
        default=False,
        metadata={
            "help": "leave out a non-zero MoE expert_bias_E (HF routes without it) "
            "instead of failing"
        },
    )
    norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    rope_theta: float = field(default=1000000.0, metadata={"help": "RoPE base"})
    max_seq_len: int = field(default=40960, metadata={"help": "context length of the model"})

    def check(self) -> None:
        super().check()
        positive(self, "n_heads", "n_kv_heads", "n_experts", "top_k")
        if self.n_heads and self.n_kv_heads and self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"experiment.model.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}"
            )


_EMBED, _NORM, _HEAD = "tok_embeddings.weight", "norm.weight", "lm_head.weight"
_WO = "layers.{}.attention.wo.weight"
_Q_NORM, _K_NORM = "layers.{}.attention.q_norm.weight", "layers.{}.attention.k_norm.weight"
_ATTENTION_NORM, _FFN_NORM = "layers.{}.attention_norm.weight", "layers.{}.ffn_norm.weight"
_W1, _W2, _W3 = (f"layers.{{}}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3"))
_GATE = "layers.{}.moe.router.gate.weight"
_EW1, _EW2, _EW3 = (
    f"layers.{{}}.moe.routed_experts.inner_experts.{w}" for w in ("w1_EFD", "w2_EDF", "w3_EFD")
)
_BIAS = "layers.{}.moe.expert_bias_E"

_ATTENTION = (WQ, WK, WV, _WO, _Q_NORM, _K_NORM, _ATTENTION_NORM, _FFN_NORM)
_DENSE = (_W1, _W2, _W3)
_MOE = (_GATE, _EW1, _EW2, _EW3)


def _same(*templates: str) -> dict[str, str]:
    return {t: t for t in templates}


_COMMON = _same(_EMBED, _NORM, *_ATTENTION[3:], *_DENSE, _GATE)
_QKV_LINEAR = _same(WQ, WK, WV)
_FUSED = _same(WQKV)
_META_QKV = {
    "layers.{}.attention.wq.weight": WQ,
    "layers.{}.attention.wk.weight": WK,
    "layers.{}.attention.wv.weight": WV,
}
_LM_HEAD = _same(_HEAD)
_OUTPUT = {"output.weight": _HEAD}
# The counts of tokens each expert got: a non-persistent buffer in every qwen3 era (since
# torchtitan aeb3a4baf, #1555, before qwen3 had experts), so torchtitan never saves it; a
# model that made it persistent has it dropped, as a statistic, not a weight.
_TOKENS_WHY = "tokens routed to each expert (a load-balancing statistic, not a weight)"
_SUFFIX_TOKENS = "layers.{}.moe.tokens_per_expert_E"
_PLAIN_TOKENS = "layers.{}.moe.tokens_per_expert"
_ROUTED = {**_same(_EW1, _EW2, _EW3, _BIAS), _SUFFIX_TOKENS: None}
_SUFFIXED = {
    "layers.{}.moe.experts.w1_EFD": _EW1,
    "layers.{}.moe.experts.w2_EDF": _EW2,
    "layers.{}.moe.experts.w3_EFD": _EW3,
    _BIAS: _BIAS,
    _SUFFIX_TOKENS: None,
}
_PLAIN = {
    "layers.{}.moe.experts.w1": _EW1,
    "layers.{}.moe.experts.w2": _EW2,
    "layers.{}.moe.experts.w3": _EW3,
    "layers.{}.moe.expert_bias": _BIAS,
    _PLAIN_TOKENS: None,
}
_SUFFIXED_DROPPED = {_SUFFIX_TOKENS: _TOKENS_WHY}
_PLAIN_DROPPED = {_PLAIN_TOKENS: _TOKENS_WHY}
_FUSED_UNTIL = "to #3656 (2026-06-19)"
_FUSE = frozenset({WQKV})

ERAS = (
    Era("#3859", "MoE routed_experts.inner_experts; qkv_linear, lm_head; torchtitan 0.3.0",
        "2026-07-16", {**_COMMON, **_QKV_LINEAR, **_LM_HEAD, **_ROUTED},
        dropped=_SUFFIXED_DROPPED),
    Era("#3425", "MoE experts.w1_EFD, expert_bias_E; qkv_linear, lm_head", "2026-05-27",
        {**_COMMON, **_QKV_LINEAR, **_LM_HEAD, **_SUFFIXED}, dropped=_SUFFIXED_DROPPED),
    Era("#3425 fuse_qkv", "MoE experts.w1_EFD; fused qkv_linear.wqkv, lm_head",
        f"2026-05-27 {_FUSED_UNTIL}", {**_COMMON, **_FUSED, **_LM_HEAD, **_SUFFIXED},
        split=_FUSE, dropped=_SUFFIXED_DROPPED),
    Era("#2937", "MoE experts.w1; qkv_linear, lm_head", "2026-04-27",
        {**_COMMON, **_QKV_LINEAR, **_LM_HEAD, **_PLAIN}, dropped=_PLAIN_DROPPED),
    Era("#2937 fuse_qkv", "MoE experts.w1; fused qkv_linear.wqkv, lm_head",
        f"2026-04-27 {_FUSED_UNTIL}", {**_COMMON, **_FUSED, **_LM_HEAD, **_PLAIN},
        split=_FUSE, dropped=_PLAIN_DROPPED),
    Era("#2878", "MoE experts.w1; qkv_linear, output", "2026-04-16",
        {**_COMMON, **_QKV_LINEAR, **_OUTPUT, **_PLAIN}, dropped=_PLAIN_DROPPED),
    Era("#2878 fuse_qkv", "MoE experts.w1; fused qkv_linear.wqkv, output", "2026-04-16",
        {**_COMMON, **_FUSED, **_OUTPUT, **_PLAIN}, split=_FUSE, dropped=_PLAIN_DROPPED),
    Era("v0.2.2", "MoE experts.w1; attention.wq, output; qwen3 in core since #1860",
        "2025-10-12", {**_COMMON, **_META_QKV, **_OUTPUT, **_PLAIN}, dropped=_PLAIN_DROPPED),
)  # fmt: skip

# torchtitan's Qwen3StateDictAdapter.from_hf_map (0.3.0), read the other way.
_HF = {
    _EMBED: Target("model.embed_tokens.weight"),
    _NORM: Target("model.norm.weight"),
    _HEAD: Target("lm_head.weight"),
    WQ: Target("model.layers.{}.self_attn.q_proj.weight"),
    WK: Target("model.layers.{}.self_attn.k_proj.weight"),
    WV: Target("model.layers.{}.self_attn.v_proj.weight"),
    _WO: Target("model.layers.{}.self_attn.o_proj.weight"),
    _Q_NORM: Target("model.layers.{}.self_attn.q_norm.weight"),
    _K_NORM: Target("model.layers.{}.self_attn.k_norm.weight"),
    _ATTENTION_NORM: Target("model.layers.{}.input_layernorm.weight"),
    _FFN_NORM: Target("model.layers.{}.post_attention_layernorm.weight"),
    _W1: Target("model.layers.{}.mlp.gate_proj.weight"),
    _W2: Target("model.layers.{}.mlp.down_proj.weight"),
    _W3: Target("model.layers.{}.mlp.up_proj.weight"),
    _GATE: Target("model.layers.{}.mlp.gate.weight"),
    _EW1: Target("model.layers.{}.mlp.experts.{e}.gate_proj.weight"),
    _EW2: Target("model.layers.{}.mlp.experts.{e}.down_proj.weight"),
    _EW3: Target("model.layers.{}.mlp.experts.{e}.up_proj.weight"),
}
_NO_PT = "torchtune 0.6.1 has no qwen3 model builder, so no torchtune recipe could load such a .pt"


class Qwen3(ModelFamily):
    name = "qwen3"
    config = Qwen3Config
    eras = ERAS
    order = (_EMBED, *_ATTENTION, *_DENSE, *_MOE, _NORM, _HEAD)
    namings = {"hf": _HF}
    unsupported = {"meta": _NO_PT, "torchtune": _NO_PT}

    def split(
        self,
        template: str,
        key: str,
        shape: tuple[int, ...],
        config: Any,
        source: str,
        shapes: Mapping[str, tuple[int, ...]],
    ) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
        """The fused QKV weight, split by the head counts its layer's shapes give: ``q_norm``
        the head size, the output projection's inputs the query rows."""
        assert template == WQKV, template
        attention = key.removesuffix("qkv_linear.wqkv.weight")
        q_norm, wo = shapes.get(attention + "q_norm.weight"), shapes.get(attention + "wo.weight")
        if q_norm is None or wo is None:
            raise ConversionError(
                f"{source} has {key!r} but not its layer's {attention}q_norm.weight and "
                f"{attention}wo.weight, whose shapes say how to split it. A partial model "
                "cannot be converted; convert a complete save."
            )
        head_dim, q_rows = q_norm[0], wo[-1]
        kv_rows = shape[0] - q_rows
        if q_rows % head_dim or kv_rows <= 0 or kv_rows % (2 * head_dim):
            raise ConversionError(
                f"{key!r} of shape {shape} in {source} does not hold whole query, key and value "
                f"heads of {head_dim} (the size of {attention}q_norm.weight) with "
                f"{q_rows} query rows (the inputs of {attention}wo.weight): not a torchtitan "
                "qwen3 fused QKV weight."
            )
        n_heads, n_kv = q_rows // head_dim, kv_rows // (2 * head_dim)
        if n_heads % n_kv:
            raise ConversionError(
                f"{key!r} of shape {shape} in {source} has {n_heads} query heads over {n_kv} "
                "key/value heads, which torchtitan's grouped-query attention cannot group."
            )
        return split_fused_qkv(key, shape, n_heads, n_kv, head_dim)

    def architecture(self, shapes: Mapping[str, tuple[int, ...]], config: Any) -> Qwen3Config:
        layers = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("layers.")})
        moe = [i for i in layers if _GATE.format(i) in shapes]
        dense = [i for i in layers if _W1.format(i) in shapes]
        if layers and not any(_Q_NORM.format(i) in shapes for i in layers):
            raise ConversionError(
                "The checkpoint's attention layers have no q_norm and k_norm weights, which "
                "every torchtitan qwen3 layer has: it is not a qwen3 model. A llama3 "
                "checkpoint's keys are these; convert it with a llama3 preset, "
                "experiment/model=llama3/<flavor>."
            )
        size = _Sizes(shapes, layers)
        vocab_size, dim = size.of(_EMBED)
        head_dim = size.of(_Q_NORM)[0]
        q_rows, k_rows = size.of(WQ)[0], size.of(WK)[0]
        if (
            size.of(_K_NORM) != (head_dim,)
            or k_rows < head_dim
            or q_rows % head_dim
            or k_rows % head_dim
            or size.of(WV) != size.of(WK)
            or size.of(_WO) != (dim, q_rows)
            or (q_rows // head_dim) % (k_rows // head_dim)
        ):
            raise ConversionError(
                f"The attention weights of the checkpoint do not fit together: q_norm "
                f"{size.of(_Q_NORM)}, k_norm {size.of(_K_NORM)}, wq {size.of(WQ)}, wk "
                f"{size.of(WK)}, wv {size.of(WV)}, wo {size.of(_WO)} (layer 0). torchtitan's "
                "qwen3 has query and key/value rows in whole heads of q_norm's size, and as "
                "many query heads per key/value head in every group: this is another model."
            )
        derived: dict[str, Any] = {
            "dim": dim,
            "n_layers": len(layers),
            "vocab_size": vocab_size,
            "head_dim": head_dim,
            "n_heads": q_rows // head_dim,
            "n_kv_heads": k_rows // head_dim,
        }
        if dense:
            derived["hidden_dim"] = size.of(_W1, dense)[0]
        if moe:
            n_experts, _ = size.of(_GATE, moe)
            moe_hidden_dim = size.of(_EW1, moe)[1]
            expected = {
                _GATE: (n_experts, dim),
                _EW1: (n_experts, moe_hidden_dim, dim),
                _EW2: (n_experts, dim, moe_hidden_dim),
                _EW3: (n_experts, moe_hidden_dim, dim),
            }
            for template, want in expected.items():
                if size.of(template, moe) != want:
                    raise ConversionError(
                        f"{template.format(moe[0])} has shape {size.of(template, moe)}, but the "
                        f"router and the other experts say {want}: not a torchtitan qwen3 "
                        "mixture-of-experts layer."
                    )
            derived.update(n_experts=n_experts, moe_hidden_dim=moe_hidden_dim, dense_layers=dense)
        check_stated(config, derived, "the checkpoint")
        _check_absent(config, derived)
        if moe and config.top_k is None:
            raise ConversionError(
                "experiment.model.top_k is not set, and the checkpoint is a mixture-of-experts "
                "model: its weights cannot say how many experts each token is routed to, which "
                "the Hugging Face config must. Set it to the trained model's top_k (8 in every "
                "torchtitan qwen3 MoE flavor), or use a preset: "
                f"{self.presets()}."
            )
        if moe and config.top_k > derived["n_experts"]:
            raise ConversionError(
                f"experiment.model.top_k={config.top_k} exceeds the checkpoint's "
                f"{derived['n_experts']} experts per layer. Set the trained model's top_k."
            )
        return dataclasses.replace(config, **derived)

    def required(self, arch: Any, layer: int) -> list[str]:
        return [*_ATTENTION, *(_MOE if _is_moe(arch, layer) else _DENSE)]

    def optional(self, arch: Any, layer: int) -> list[str]:
        return [_BIAS] if _is_moe(arch, layer) else []

    def check_values(
        self, source: Source, era: Era, keys: Mapping[str, str], arch: Any
    ) -> list[Dropped]:
        """The expert bias of each MoE layer: left out if zero; if not, an error unless the
        user accepts that the Hugging Face model routes without it."""
        dropped, steering = [], []
        for canonical, saved in keys.items():
            if not _is(canonical, _BIAS):
                continue
            bias = source.read(saved).float()
            largest = bias.abs().max().item()
            if not torch.any(bias != 0):
                why = (
                    "auxiliary-loss-free load-balancing bias, all zero: it never changed which "
                    "experts a token is routed to; Hugging Face's Qwen3-MoE has no such bias"
                )
            elif arch.accept_expert_bias:
                why = (
                    f"auxiliary-loss-free load-balancing bias, max |bias| {largest:.6g} in this "
                    "layer: left out as experiment.model.accept_expert_bias=true allows; the "
                    "Hugging Face model routes tokens without it"
                )
            else:
                steering.append((largest, saved))
                continue
            dropped.append(Dropped(canonical, why))
        if steering:
            largest, at = max(steering)
            raise ConversionError(
                f"{source.name} holds a non-zero expert_bias_E in {len(steering)} of its "
                f"mixture-of-experts layers (largest |bias| {largest:.6g}, in {at!r}). "
                "torchtitan's router adds this load-balancing bias to the scores when it picks "
                "each token's experts (trained since torchtitan #3666); Hugging Face's "
                "Qwen3-MoE has no such bias, so the converted model would route tokens "
                "differently from the trained one. To convert anyway, set "
                "experiment.model.accept_expert_bias=true: the bias is left out and the "
                "manifest records its size per layer. Nothing was written."
            )
        return dropped

    def assumptions(self, arch: Qwen3Config, era: Era, keys: Collection[str]) -> list[str]:
        # With experts, neither how many each token is routed to nor whether their scores are
        # renormalised (HF's num_experts_per_tok, norm_topk_prob) is in the weights either.
        routing = ("top_k", "route_norm") if arch.n_experts else ()
        settings = ("norm_eps", "rope_theta", "max_seq_len", *routing)
        said = [self.settings_assumed({k: getattr(arch, k) for k in settings})]
        if arch.accept_expert_bias:
            said.append(
                "accept_expert_bias=true: a non-zero expert_bias_E is left out, and the Hugging "
                "Face model routes tokens without it; the manifest's dropped keys give each "
                "layer's largest |bias|."
            )
        return said

    # ---------------------------------------------------------------- what formats write

    def hf_config(self, arch: Qwen3Config) -> dict[str, Any]:
        """``config.json`` for transformers' ``Qwen3ForCausalLM`` or, with experts,
        ``Qwen3MoeForCausalLM``, the MoE routing as torchtitan's (every layer but the dense
        ones, top-k of a softmax, renormalised as ``route_norm`` says).

        ``head_dim`` is always written: Qwen3-MoE's config has no such field and would take
        ``hidden_size / num_attention_heads`` without it. RoPE is written as transformers 5
        writes it (``rope_parameters``) and as transformers 4 reads it (``rope_theta``)."""
        theta = float(arch.rope_theta)
        config: dict[str, Any] = {
            "architectures": ["Qwen3MoeForCausalLM" if arch.n_experts else "Qwen3ForCausalLM"],
            "model_type": "qwen3_moe" if arch.n_experts else "qwen3",
            "hidden_size": arch.dim,
            "num_attention_heads": arch.n_heads,
            "num_key_value_heads": arch.n_kv_heads,
            "head_dim": arch.head_dim,
            "num_hidden_layers": arch.n_layers,
            "vocab_size": arch.vocab_size,
            "rms_norm_eps": float(arch.norm_eps),
            "max_position_embeddings": int(arch.max_seq_len),
            "tie_word_embeddings": arch.tied_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "rope_theta": theta,
            "rope_scaling": None,
        }
        if arch.hidden_dim is not None:
            config["intermediate_size"] = arch.hidden_dim
        if arch.n_experts:
            config.update(
                num_experts=arch.n_experts,
                num_experts_per_tok=arch.top_k,
                moe_intermediate_size=arch.moe_hidden_dim,
                norm_topk_prob=arch.route_norm,
                decoder_sparse_step=1,
                mlp_only_layers=list(arch.dense_layers or ()),
            )
        return config


class _Sizes:
    """The shape of a template in the first layer that has it (every layer that has it has
    the same: ``build_plan`` checked)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], layers: list[int]) -> None:
        self.shapes = shapes
        self.layers = layers

    def of(self, template: str, layers: list[int] | None = None) -> tuple[int, ...]:
        keys = [template.format(i) for i in (self.layers if layers is None else layers)]
        found = [self.shapes[k] for k in keys if k in self.shapes]
        if not found:
            raise ConversionError(
                f"The checkpoint lacks {keys[0] if keys else template} (named as torchtitan "
                "0.3.0 saves it). A partial model cannot be converted."
            )
        return found[0]


def _is_moe(arch: Qwen3Config, layer: int) -> bool:
    return bool(arch.n_experts) and layer not in (arch.dense_layers or ())


def _is(key: str, template: str) -> bool:
    head, tail = template.split("{}")
    return key.startswith(head) and key.endswith(tail) and key[len(head) : -len(tail)].isdigit()


def _check_absent(config: Qwen3Config, derived: Mapping[str, Any]) -> None:
    """A field stated for a part the checkpoint does not have (experts in a dense model, a
    dense feed-forward in an all-MoE one) is a preset for another model."""
    parts = {
        "hidden_dim": "has no dense feed-forward layer (no feed_forward.w1.weight)",
        "n_experts": "has no mixture-of-experts layer (no moe.router.gate.weight)",
        "moe_hidden_dim": "has no mixture-of-experts layer (no moe.router.gate.weight)",
        "dense_layers": "has no mixture-of-experts layer (no moe.router.gate.weight)",
    }
    wrong = [
        f"{name}={getattr(config, name)}: the checkpoint {why}"
        for name, why in parts.items()
        if name not in derived and getattr(config, name) not in (None, [])
    ]
    if wrong:
        raise ConversionError(
            f"experiment.model does not fit the checkpoint: {'; '.join(wrong)}. Leave these "
            "fields out (null), or choose the preset of the model that was trained."
        )
