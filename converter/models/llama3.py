"""Llama 3 as torchtitan trains it (``torchtitan/models/llama3``).

Canonical names are torchtitan 0.3.0's. The layout eras, newest first:

- #2937 (2026-04-27, "ChunkedCELoss"): ``output`` renamed ``lm_head``. Since #3656 (2026-06-19)
  a fused QKV is saved split by state-dict hooks, so torchtitan 0.3.0 saves these keys.
- #2937 with ``fuse_qkv=True``, before #3656: one fused ``attention.qkv_linear.wqkv`` per layer.
- #2878 (2026-04-16, "Fused QKV GQAttention implementation"): ``attention.qkv_linear.{wq,wk,wv}``,
  or the fused ``wqkv`` with ``fuse_qkv=True``; ``output.weight``.
- #1347 (2025-07-03, "Always flatten model state_dict"): Meta's names at the top level.
- v0.1.0 and before: the same names nested under ``model.``, with the RoPE table
  ``model.freqs_cis`` until #1338 (2025-06-26, "Always ignore freqs_cis") left it out.

RoPE is complex ("interleaved"), as in Meta's reference code and torchtune; Hugging Face rotates
halves, so its naming reorders the rows of ``wq`` and ``wk`` per head, as torchtitan's own
``Llama3StateDictAdapter.to_hf`` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import MISSING

from converter.errors import ConversionError
from converter.models.base import (
    Dropped,
    Era,
    ModelConfig,
    ModelFamily,
    Source,
    Target,
    check_stated,
    positive,
)
from converter.models.common import WK, WQ, WQKV, WV, split_fused_qkv
from converter.plan import Piece, RowOrder


@dataclass
class Llama3Config(ModelConfig):
    """A torchtitan llama3 model (``conf/experiment/model/llama3/<flavor>.yaml``)."""

    family: str = "llama3"
    n_heads: int = field(
        default=MISSING,
        metadata={"help": "attention heads (the shapes cannot tell 16 heads of 16 from 4 of 64)"},
    )
    # torchtitan's ComplexRoPE with scaling="llama": Llama 3.1's frequency scaling.
    rope_scaling: bool = field(default=True, metadata={"help": "Llama 3.1-style RoPE scaling"})
    rope_scaling_factor: float = field(default=8.0, metadata={"help": "its scaling_factor"})
    rope_low_freq_factor: float = field(default=1.0, metadata={"help": "its low_freq_factor"})
    rope_high_freq_factor: float = field(default=4.0, metadata={"help": "its high_freq_factor"})
    rope_original_max_seq_len: int = field(
        default=8192, metadata={"help": "its original_max_position_embeddings"}
    )

    def check(self) -> None:
        super().check()
        if self.rope_scaling:
            factors = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor")
            positive(self, *factors, "rope_original_max_seq_len")
            if not self.rope_high_freq_factor > self.rope_low_freq_factor:
                raise ValueError(
                    f"experiment.model.rope_high_freq_factor={self.rope_high_freq_factor} must be "
                    f"above rope_low_freq_factor={self.rope_low_freq_factor}: Llama 3.1's RoPE "
                    "scaling blends between the two"
                )
        if self.n_heads is None or self.n_heads <= 0:  # null: the base schema allows it
            raise ValueError(
                f"experiment.model.n_heads must be a positive number, got {self.n_heads}: the "
                "weights cannot tell the head count, so a llama3 model states it"
            )
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(
                f"experiment.model.n_kv_heads={self.n_kv_heads} must be a positive divisor of "
                f"n_heads={self.n_heads}"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


_ATTENTION = "layers.{}.attention."
_WQ, _WK, _WV, _WQKV = WQ, WK, WV, WQKV  # torchtitan's common attention module
_LAYER_KEYS = (
    _WQ,
    _WK,
    _WV,
    "layers.{}.attention.wo.weight",
    "layers.{}.attention_norm.weight",
    "layers.{}.ffn_norm.weight",
    "layers.{}.feed_forward.w1.weight",
    "layers.{}.feed_forward.w2.weight",
    "layers.{}.feed_forward.w3.weight",
)
_SAME = {k: k for k in ("tok_embeddings.weight", "norm.weight", *_LAYER_KEYS[3:])}
_QKV_LINEAR = {_WQ: _WQ, _WK: _WK, _WV: _WV}
_META_QKV = {
    f"{_ATTENTION}{w}.weight": t for w, t in zip(("wq", "wk", "wv"), (_WQ, _WK, _WV), strict=True)
}
_FREQS = (
    "RoPE frequencies (a buffer; every consumer recomputes them from rope_theta and the "
    "rope_scaling settings, which were checked against it)"
)
# torchtitan #1839 (5bbda42c7, 2025-10-08) added Llama 3.1's RoPE scaling, on in every llama3
# flavor from then on; models trained before had none. Nested saves all predate it (and most
# keep the RoPE table, which is checked besides); #1347's layout was saved on both sides of the
# change with no table, so the setting is an assumption there.
_BEFORE_ROPE_SCALING = frozenset({"v0.1.0"})
_SPANS_ROPE_SCALING = frozenset({"#1347"})
# What torchtune's Llama3ScaledRoPE fixes besides scale_factor (its builders take no others).
_TORCHTUNE_ROPE = {
    "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0,
    "rope_original_max_seq_len": 8192,
}

ERAS = (
    Era("#2937", "qkv_linear, lm_head; torchtitan 0.3.0", "2026-04-27",
        {**_SAME, **_QKV_LINEAR, "lm_head.weight": "lm_head.weight"}),
    Era("#2937 fuse_qkv", "fused qkv_linear.wqkv, lm_head", "2026-04-27 to #3656 (2026-06-19)",
        {**_SAME, _WQKV: _WQKV, "lm_head.weight": "lm_head.weight"}, split=frozenset({_WQKV})),
    Era("#2878", "qkv_linear, output", "2026-04-16",
        {**_SAME, **_QKV_LINEAR, "output.weight": "lm_head.weight"}),
    Era("#2878 fuse_qkv", "fused qkv_linear.wqkv, output", "2026-04-16",
        {**_SAME, _WQKV: _WQKV, "output.weight": "lm_head.weight"}, split=frozenset({_WQKV})),
    Era("#1347", "flat, Meta's names", "2025-07-03",
        {**_SAME, **_META_QKV, "output.weight": "lm_head.weight", "freqs_cis": None},
        dropped={"freqs_cis": _FREQS}),
    Era("v0.1.0", "nested under model.", "torchtitan v0.1.0 and before",
        {**_SAME, **_META_QKV, "output.weight": "lm_head.weight", "freqs_cis": None},
        nested=True, dropped={"freqs_cis": _FREQS}),
)  # fmt: skip

_GLOBAL_NAMES = {"tok_embeddings.weight": "tok_embeddings.weight", "norm.weight": "norm.weight"}
_META = {
    **{k: Target(k) for k in _GLOBAL_NAMES},
    "lm_head.weight": Target("output.weight"),
    **{t: Target(k) for k, t in _META_QKV.items()},
    **{k: Target(k) for k in _LAYER_KEYS[3:]},
}
_TORCHTUNE = {
    "tok_embeddings.weight": Target("tok_embeddings.weight"),
    "norm.weight": Target("norm.scale"),
    "lm_head.weight": Target("output.weight"),
    _WQ: Target("layers.{}.attn.q_proj.weight"),
    _WK: Target("layers.{}.attn.k_proj.weight"),
    _WV: Target("layers.{}.attn.v_proj.weight"),
    "layers.{}.attention.wo.weight": Target("layers.{}.attn.output_proj.weight"),
    "layers.{}.attention_norm.weight": Target("layers.{}.sa_norm.scale"),
    "layers.{}.ffn_norm.weight": Target("layers.{}.mlp_norm.scale"),
    "layers.{}.feed_forward.w1.weight": Target("layers.{}.mlp.w1.weight"),
    "layers.{}.feed_forward.w2.weight": Target("layers.{}.mlp.w2.weight"),
    "layers.{}.feed_forward.w3.weight": Target("layers.{}.mlp.w3.weight"),
}
# As torchtitan's Llama3StateDictAdapter.from_hf_map, read the other way.
_HF = {
    "tok_embeddings.weight": Target("model.embed_tokens.weight"),
    "norm.weight": Target("model.norm.weight"),
    "lm_head.weight": Target("lm_head.weight"),
    _WQ: Target("model.layers.{}.self_attn.q_proj.weight", RowOrder.rope_halves),
    _WK: Target("model.layers.{}.self_attn.k_proj.weight", RowOrder.rope_halves),
    _WV: Target("model.layers.{}.self_attn.v_proj.weight"),
    "layers.{}.attention.wo.weight": Target("model.layers.{}.self_attn.o_proj.weight"),
    "layers.{}.attention_norm.weight": Target("model.layers.{}.input_layernorm.weight"),
    "layers.{}.ffn_norm.weight": Target("model.layers.{}.post_attention_layernorm.weight"),
    "layers.{}.feed_forward.w1.weight": Target("model.layers.{}.mlp.gate_proj.weight"),
    "layers.{}.feed_forward.w2.weight": Target("model.layers.{}.mlp.down_proj.weight"),
    "layers.{}.feed_forward.w3.weight": Target("model.layers.{}.mlp.up_proj.weight"),
}


class Llama3(ModelFamily):
    name = "llama3"
    config = Llama3Config
    eras = ERAS
    order = ("tok_embeddings.weight", *_LAYER_KEYS, "norm.weight", "lm_head.weight")
    namings = {"meta": _META, "torchtune": _TORCHTUNE, "hf": _HF}

    def split(
        self,
        template: str,
        key: str,
        shape: tuple[int, ...],
        config: Any,
        source: str,
        shapes: Mapping[str, tuple[int, ...]],
    ) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
        """The fused QKV weight (torchtitan's ``FusedQKVLinear``) split with the configured
        head counts: its shape alone cannot give them."""
        assert template == _WQKV, template
        n_heads, n_kv = config.n_heads, config.kv_heads
        rows = shape[0]
        if rows % (n_heads + 2 * n_kv):
            raise ConversionError(
                f"experiment.model.n_heads={n_heads} and n_kv_heads={config.n_kv_heads} "
                f"contradict {key!r} of shape {shape} in {source}: its rows must be "
                "(n_heads + 2 * n_kv_heads) * head_dim. Set the head counts of the model that "
                "was trained."
            )
        return split_fused_qkv(key, shape, n_heads, n_kv, rows // (n_heads + 2 * n_kv))

    def architecture(self, shapes: Mapping[str, tuple[int, ...]], config: Any) -> Llama3Config:
        vocab_size, dim = shapes["tok_embeddings.weight"]
        n_layers = len({k.split(".")[1] for k in shapes if k.startswith("layers.")})
        q_rows = shapes[_WQ.format(0)][0]
        k_rows = shapes[_WK.format(0)][0]
        o_cols = shapes["layers.0.attention.wo.weight"][-1]
        n_heads, n_kv = config.n_heads, config.kv_heads
        # The head counts must fit the weights: query rows in n_heads whole heads, key rows
        # in proportion n_kv_heads / n_heads, and the attention output projection must take
        # the query rows back (which catches a fused QKV split by wrong head counts).
        if q_rows % n_heads:
            why = f"its {q_rows} query rows do not make {n_heads} whole heads"
        elif k_rows * n_heads != q_rows * n_kv:
            why = (
                f"its {k_rows} key rows for {q_rows} query rows give n_kv_heads / n_heads = "
                f"{k_rows}/{q_rows}, not {n_kv}/{n_heads}"
            )
        elif q_rows != o_cols:
            why = f"its attention output projection takes {o_cols} inputs, not {q_rows}"
        else:
            why = ""
        if why:
            raise ConversionError(
                f"experiment.model.n_heads={n_heads} and n_kv_heads={config.n_kv_heads} "
                f"contradict layer 0 of the checkpoint: {why}. Set the head counts of the "
                "model that was trained."
            )
        derived = {
            "dim": dim,
            "n_layers": n_layers,
            "vocab_size": vocab_size,
            "hidden_dim": shapes["layers.0.feed_forward.w1.weight"][0],
            "head_dim": q_rows // n_heads,
        }
        check_stated(config, derived, "the checkpoint")
        return dataclasses.replace(config, n_kv_heads=n_kv, **derived)

    def required(self, arch: Any, layer: int) -> list[str]:
        return list(_LAYER_KEYS)

    def check_values(
        self, source: Source, era: Era, keys: Mapping[str, str], arch: Any
    ) -> list[Dropped]:
        """The RoPE settings from which the output's consumers compute theirs: a layout from
        before torchtitan had RoPE scaling cannot have trained with it, and a saved RoPE table
        (``freqs_cis``) must be the settings' own, of the configured head size."""
        if "freqs_cis" in keys:
            saved = keys["freqs_cis"]
            _check_rope_table(source.read(saved), arch, f"{saved!r} in {source.name}")
        elif era.name in _BEFORE_ROPE_SCALING and arch.rope_scaling:
            raise ConversionError(
                f"{source.name} is a {era.describe()} save, from before torchtitan added Llama "
                "3.1 RoPE scaling (#1839, 2025-10-08), but experiment.model.rope_scaling=true "
                "would make every consumer compute the model's RoPE scaled. Set "
                "experiment.model.rope_scaling=false. Nothing was written."
            )
        return []

    def assumptions(self, arch: Llama3Config, era: Era, keys: Collection[str]) -> list[str]:
        said = []
        if era.split:
            said.append(
                f"the fused QKV weights are split with n_heads={arch.n_heads} and "
                f"n_kv_heads={arch.kv_heads} as configured: their shapes cannot tell these from "
                "head counts in the same proportion (8/2 from 4/1, which splits differently). "
                "If the model was trained with other head counts, set them and convert again."
            )
        elif "freqs_cis" not in keys:  # its width is 2 x head_dim: checked
            said.append(
                f"n_heads={arch.n_heads} and n_kv_heads={arch.kv_heads} are taken from the "
                "config: the weights fix n_heads x head_dim and the ratio n_kv_heads / n_heads, "
                "not the head count itself (16 heads of 16 and 4 heads of 64 have the same "
                "shapes, and torchtune computes other logits with the wrong one). Check them "
                "against the model that was trained (torchtitan's flavors are the presets "
                f"{self.presets()})."
            )
        if era.name in _SPANS_ROPE_SCALING and "freqs_cis" not in keys:
            other = str(not arch.rope_scaling).lower()
            said.append(
                f"rope_scaling={str(arch.rope_scaling).lower()} is taken from the config: "
                "torchtitan's llama3 trains with Llama 3.1 RoPE scaling since #1839 "
                f"(2025-10-08) and without it before, and this layout ({era.name}) was saved "
                "on both sides of that change with no RoPE table to tell. If the model was "
                f"trained {'before' if arch.rope_scaling else 'after'} it, set "
                f"experiment.model.rope_scaling={other} and convert again."
            )
        settings = ["norm_eps", "max_seq_len"]
        if "freqs_cis" not in keys:  # the table fixes RoPE: checked
            settings += ["rope_theta", "rope_scaling"]
            settings += ["rope_scaling_factor", *_TORCHTUNE_ROPE] if arch.rope_scaling else []
        said.append(self.settings_assumed({k: getattr(arch, k) for k in settings}))
        return said + _beyond_torchtune(arch)

    # ---------------------------------------------------------------- what formats write

    def hf_config(self, arch: Llama3Config) -> dict[str, Any]:
        """``config.json`` for transformers' ``LlamaForCausalLM``.

        RoPE is written twice, with the same values: as transformers 5 writes it
        (``rope_parameters``, the base frequency inside) and as transformers 4 and other
        readers want it (``rope_theta``, ``rope_scaling``); a reader of either finds every key,
        where one missing would silently fall back to another theta or context length."""
        theta = float(arch.rope_theta)
        scaling = None
        if arch.rope_scaling:
            scaling = {
                "rope_type": "llama3",
                "factor": float(arch.rope_scaling_factor),
                "low_freq_factor": float(arch.rope_low_freq_factor),
                "high_freq_factor": float(arch.rope_high_freq_factor),
                "original_max_position_embeddings": int(arch.rope_original_max_seq_len),
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": arch.dim,
            "intermediate_size": arch.hidden_dim,
            "num_attention_heads": arch.n_heads,
            "num_key_value_heads": arch.kv_heads,
            "head_dim": arch.head_dim,
            "num_hidden_layers": arch.n_layers,
            "vocab_size": arch.vocab_size,
            "rms_norm_eps": float(arch.norm_eps),
            "max_position_embeddings": int(arch.max_seq_len),
            "tie_word_embeddings": arch.tied_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta},
            "rope_theta": theta,
            "rope_scaling": scaling,
        }

    def torchtune_model(self, arch: Llama3Config) -> dict[str, Any] | None:
        """torchtune's llama3-family component builder with the model's dimensions; None if
        it cannot build this model (see ``assumptions``)."""
        if _beyond_torchtune(arch):
            return None
        args: dict[str, Any] = {
            "vocab_size": arch.vocab_size,
            "num_layers": arch.n_layers,
            "num_heads": arch.n_heads,
            "num_kv_heads": arch.kv_heads,
            "embed_dim": arch.dim,
            "max_seq_len": arch.max_seq_len,
            "intermediate_dim": arch.hidden_dim,
            "norm_eps": arch.norm_eps,
            "rope_base": arch.rope_theta,
        }
        if arch.tied_embeddings:
            # llama3_2's builder ties the output projection to the embeddings; it always
            # applies Llama 3.1-style RoPE scaling, by 32 unless told (torchtitan's is 8), and
            # a factor of 1 leaves every frequency as it is.
            component = "torchtune.models.llama3_2.llama3_2"
            args["tie_word_embeddings"] = True
            args["scale_factor"] = arch.rope_scaling_factor if arch.rope_scaling else 1.0
        elif arch.rope_scaling:
            component = "torchtune.models.llama3_1.llama3_1"
            args["scale_factor"] = arch.rope_scaling_factor
        else:
            component = "torchtune.models.llama3.llama3"
        return {"_component_": component, **args}

    def torchtune_model_type(self, arch: Llama3Config) -> str:
        # LLAMA3_2 is torchtune's model type for tied embeddings (no output.weight).
        return "LLAMA3_2" if arch.tied_embeddings else "LLAMA3"


def _beyond_torchtune(arch: Llama3Config) -> list[str]:
    """Why torchtune's llama3 builders cannot build this model, if they cannot."""
    why = []
    if arch.rope_scaling and any(getattr(arch, k) != v for k, v in _TORCHTUNE_ROPE.items()):
        why.append(
            "rope_low_freq_factor, rope_high_freq_factor and rope_original_max_seq_len "
            f"({arch.rope_low_freq_factor}, {arch.rope_high_freq_factor}, "
            f"{arch.rope_original_max_seq_len}) are not torchtune's: its llama3 RoPE fixes "
            "them at 1, 4 and 8192, so a torchtune model would compute other logits and no "
            "recipe model: section is written. config.json carries them for transformers."
        )
    if arch.head_dim != arch.dim // arch.n_heads:
        why.append(
            f"the attention heads are {arch.head_dim} wide, not dim // n_heads = "
            f"{arch.dim // arch.n_heads} as torchtune's llama3 builders make them, so no "
            "recipe model: section is written. config.json states head_dim for transformers."
        )
    return why


def _rope_frequencies(arch: Llama3Config) -> torch.Tensor:
    """The RoPE frequencies torchtitan's llama3 computes (``precompute_freqs_cis``, with
    #1839's scaling when ``rope_scaling``): ``head_dim / 2`` of them, in radians per position."""
    hd = arch.head_dim
    freqs = 1.0 / (arch.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if not arch.rope_scaling:
        return freqs
    # Llama 3.1: long wavelengths slowed by the factor, short ones kept, the band between
    # blended linearly in original_max_seq_len / wavelength.
    context, low, high = (
        arch.rope_original_max_seq_len,
        arch.rope_low_freq_factor,
        arch.rope_high_freq_factor,
    )
    wavelength = 2 * math.pi / freqs
    slowed = freqs / arch.rope_scaling_factor
    blend = (context / wavelength - low) / (high - low)
    between = (1 - blend) * slowed + blend * freqs
    return torch.where(
        wavelength > context / low,
        slowed,
        torch.where(wavelength < context / high, freqs, between),
    )


def _check_rope_table(saved: torch.Tensor, arch: Llama3Config, where: str) -> None:
    """``saved`` (a save's ``freqs_cis``: row ``t`` holds ``exp(i t f)`` for each frequency
    ``f``) must be of ``arch``'s head size and frequencies. Compared on row 1, whose angles are
    the frequencies themselves: later rows multiply a last-bit difference in a frequency (one
    computed on a GPU, say) by the position."""
    if not saved.is_complex() or saved.dim() != 2:
        raise ConversionError(
            f"{where} is a {saved.dtype} tensor of shape {list(saved.shape)}, not a RoPE "
            "table ([positions, head_dim / 2], complex) as torchtitan saves freqs_cis. The "
            "checkpoint is not a torchtitan llama3 save, or is damaged."
        )
    head_dim = 2 * saved.shape[1]
    if head_dim != arch.head_dim:
        raise ConversionError(
            f"{where} is the RoPE table of heads of {head_dim} values, so the model has "
            f"n_heads = dim / {head_dim} = {arch.dim // head_dim}; experiment.model.n_heads="
            f"{arch.n_heads} makes heads of {arch.head_dim}. Set the n_heads and n_kv_heads of "
            "the model that was trained. Nothing was written."
        )
    if saved.shape[0] < 2:
        return  # no frequencies to compare: position 0 turns nothing
    trained = saved[1].angle()

    def matches(settings: Llama3Config) -> bool:
        return torch.allclose(trained, _rope_frequencies(settings), rtol=1e-4, atol=0)

    if matches(arch):
        return
    flipped = dataclasses.replace(arch, rope_scaling=not arch.rope_scaling)
    if matches(flipped):
        fix = (
            f"set experiment.model.rope_scaling={str(flipped.rope_scaling).lower()} "
            "(torchtitan added Llama 3.1 RoPE scaling in #1839, 2025-10-08)"
        )
    else:
        fix = "set the rope_theta and rope_scaling settings of the model that was trained"
    raise ConversionError(
        f"{where} holds the RoPE frequencies the model was trained with, and they are not "
        f"those of experiment.model.rope_theta={arch.rope_theta} with rope_scaling="
        f"{str(arch.rope_scaling).lower()}, from which the output's consumers would compute "
        f"theirs: {fix}. Nothing was written."
    )
