"""The qwen3 planner on tensor tables, in seconds: no ranks, no files.

The tables are torchtitan's own: its models built on the meta device (every registered flavor)
or, for the tiny variants of ``tests/peers/qwen3_writer.py``, filled with seeded random values;
the older layouts are those ``qwen3_writer.era_state`` saves, fused by torchtitan's own
``FusedQKVLinear`` hook. Each plan is held to torchtitan's ``Qwen3StateDictAdapter.to_hf``:
its names and shapes for every flavor, and, carried out row by row on the tiny variants'
values, its tensors bit for bit.
"""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from omegaconf import OmegaConf

from converter.errors import ConversionError
from converter.models import FAMILIES
from converter.models.base import build_plan
from converter.models.qwen3 import Qwen3Config
from converter.plan import Plan, row_shape
from tests.conftest import compose
from tests.peers import qwen3_writer

QWEN3 = FAMILIES["qwen3"]
FLAVORS = (
    "debugmodel",
    "debugmodel_non_fused_qkv",
    "0.6B",
    "1.7B",
    "4B",
    "8B",
    "14B",
    "32B",
    "debugmodel_moe",
    "30B-A3B",
    "235B-A22B",
)
TINY = qwen3_writer.VARIANTS
TRAINING = {"optimizer.state.layers.0.attention.wo.weight.exp_avg": ((64, 128), torch.float32)}


@cache
def titan_model(variant: str) -> torch.nn.Module:
    """torchtitan's model of a flavor or tiny variant, on the meta device."""
    with torch.device("meta"):
        return qwen3_writer.model_config(variant).build()


def titan_state(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """torchtitan 0.3.0's state dict of a tiny variant with seeded random values (norms around
    1, the expert bias zero); a tied head is the embeddings' tensor, as torchtitan's is."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, meta in titan_model(variant).state_dict().items():
        if key == "lm_head.weight" and titan_model(variant).enable_weight_tying:
            out[key] = out["tok_embeddings.weight"]
        elif key.endswith("expert_bias_E"):
            out[key] = torch.zeros(meta.shape)
        elif meta.dim() == 1:
            out[key] = 1.0 + 0.1 * torch.randn(meta.shape, generator=gen)
        else:
            out[key] = 0.02 * torch.randn(meta.shape, generator=gen)
    return out


def in_era(state: dict[str, torch.Tensor], era: str, variant: str) -> dict[str, torch.Tensor]:
    modules = {
        f"layers.{i}.attention.qkv_linear.": block.attention.qkv_linear
        for i, block in titan_model(variant).layers.items()
    }
    return qwen3_writer.era_state(state, {}, qwen3_writer.ERAS[era], modules)[0]


def to_hf(variant: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchtitan's own offline export of a 0.3.0 state dict."""
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    cfg = qwen3_writer.model_config(variant)
    return Qwen3StateDictAdapter(cfg, None).to_hf(dict(state))


def config_of(variant: str, **fields) -> Qwen3Config:
    """The config a user states for a tiny variant: the tie and top_k, which the shapes
    cannot give."""
    dims = qwen3_writer.model_dims(qwen3_writer.model_config(variant))
    return Qwen3Config(tied_embeddings=dims["tied"], top_k=dims["top_k"], **fields)


def plan_of(
    config: Qwen3Config,
    saved: dict[str, torch.Tensor],
    naming: str = "hf",
    extra: dict | None = None,
) -> tuple[Plan, Qwen3Config]:
    tensors = {k: (tuple(v.shape), v.dtype) for k, v in saved.items()}
    return build_plan(
        QWEN3,
        config,
        {**tensors, **(extra or {})},
        [],
        naming,
        False,  # the hf format leaves a tied head out
        None,
        lambda key: read(saved[key]),
        "step-3",
        FAMILIES.values(),
    )


def read(tensor: torch.Tensor) -> torch.Tensor:
    """A small tensor's values (a meta tensor's expert bias reads as a fresh model's, zero)."""
    return torch.zeros(tensor.shape, dtype=tensor.dtype) if tensor.is_meta else tensor


def carry_out(plan: Plan, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plan's contract, row by row: each piece's source rows land at its output rows."""
    out = {}
    for tensor in plan.tensors:
        rows, width = row_shape(tensor.shape)
        into = torch.full((rows, width), float("nan"), dtype=tensor.dtype)
        for p in tensor.pieces:
            assert p.reorder is None, "qwen3 reorders no rows"
            source = saved[p.source].reshape(-1, width)
            into[p.dst_start : p.dst_start + p.src_stop - p.src_start] = source[
                p.src_start : p.src_stop
            ]
        out[tensor.name] = into.view(tensor.shape)
    return out


# -------------------------------------------------------------------- every flavor, as to_hf


def preset(flavor: str) -> Qwen3Config:
    """A preset as `experiment/model=qwen3/<flavor>` composes it."""
    cfg = compose(["experiment=debug", f"experiment/model=qwen3/{flavor}"])
    model = OmegaConf.to_object(cfg.experiment.model)
    assert isinstance(model, Qwen3Config)
    return model


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_flavor_plans_as_torchtitans_to_hf_with_its_preset(flavor):
    """The preset of each flavor torchtitan 0.3.0 registers passes the checks against the
    flavor's real shapes, states what torchtitan's config says, and the plan writes the keys
    and shapes of torchtitan's own to_hf."""
    model = titan_model(flavor)
    state = model.state_dict()
    plan, arch = plan_of(preset(flavor), dict(state))
    assert {t.name: tuple(t.shape) for t in plan.tensors} == {
        k: tuple(v.shape) for k, v in to_hf(flavor, state).items()
    }
    dims = qwen3_writer.model_dims(qwen3_writer.model_config(flavor))
    for name in ("n_heads", "n_kv_heads", "head_dim", "dim", "n_layers", "vocab_size"):
        assert getattr(arch, name) == dims[name], name
    assert arch.hidden_dim == dims["hidden_dim"]
    assert (arch.n_experts, arch.moe_hidden_dim, arch.top_k) == (
        dims["n_experts"],
        dims["moe_hidden_dim"],
        dims["top_k"],
    )
    if dims["n_experts"]:
        assert arch.route_norm == dims["route_norm"] and dims["score_func"] == "softmax"
    assert (arch.rope_theta, arch.max_seq_len, arch.norm_eps, arch.tied_embeddings) == (
        dims["rope_theta"],
        dims["max_seq_len"],
        dims["norm_eps"],
        dims["tied"],
    )
    assert plan.layout == "#3859"
    # Every key is converted or dropped with its reason.
    converted = {p.source for t in plan.tensors for p in t.pieces}
    assert converted | {d.key for d in plan.dropped} == set(state)


@pytest.mark.parametrize("flavor", ["debugmodel", "debugmodel_moe", "235B-A22B"])
def test_hf_config_is_what_transformers_reads_for_the_flavor(flavor, tmp_path):
    """config.json as ``from_pretrained`` reads it (transformers 5.24)."""
    from transformers import AutoConfig

    _, arch = plan_of(preset(flavor), dict(titan_model(flavor).state_dict()))
    (tmp_path / "config.json").write_text(json.dumps(QWEN3.hf_config(arch)))
    read = AutoConfig.from_pretrained(tmp_path)
    dims = qwen3_writer.model_dims(qwen3_writer.model_config(flavor))
    assert read.head_dim == dims["head_dim"] != dims["dim"] // dims["n_heads"]
    assert read.rope_parameters["rope_theta"] == dims["rope_theta"]
    assert read.tie_word_embeddings == dims["tied"]
    assert (read.num_attention_heads, read.num_key_value_heads) == (
        dims["n_heads"],
        dims["n_kv_heads"],
    )
    if dims["n_experts"]:
        assert type(read).__name__ == "Qwen3MoeConfig"
        assert (read.num_experts, read.num_experts_per_tok, read.moe_intermediate_size) == (
            dims["n_experts"],
            dims["top_k"],
            dims["moe_hidden_dim"],
        )
        assert read.norm_topk_prob is True and read.mlp_only_layers == []
        assert read.decoder_sparse_step == 1
    else:
        assert type(read).__name__ == "Qwen3Config"
        assert read.intermediate_size == dims["hidden_dim"]


# -------------------------------------------------------------------- every era, bit for bit

ERAS = list(qwen3_writer.ERAS)
# A dense model's keys did not change with the MoE renames, so the newest era they fit names it.
DENSE_LAYOUT = {"#3425": "#3859", "#2937": "#3859", "#2937 fuse_qkv": "#3425 fuse_qkv"}


@pytest.mark.parametrize("variant", TINY)
@pytest.mark.parametrize("era", ["0.3.0", *ERAS])
def test_every_era_plans_torchtitans_to_hf_bit_for_bit(variant, era):
    state = titan_state(variant)
    saved = state if era == "0.3.0" else in_era(state, era, variant)
    plan, _ = plan_of(config_of(variant), saved)
    ours = carry_out(plan, saved)
    theirs = to_hf(variant, state)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    if era == "0.3.0":
        assert plan.layout == "#3859"
    elif variant == "dense_tied":
        assert plan.layout == DENSE_LAYOUT.get(era, era)
    else:
        assert plan.layout == era
    converted = {p.source for t in plan.tensors for p in t.pieces}
    assert converted | {d.key for d in plan.dropped} == set(saved)
    assert not converted & {d.key for d in plan.dropped}


def test_the_fused_eras_really_save_a_fused_qkv():
    """So the test above splits a real ``wqkv``: torchtitan's hook fused it."""
    saved = in_era(titan_state("moe"), "#2878 fuse_qkv", "moe")
    assert "layers.0.attention.qkv_linear.wqkv.weight" in saved
    assert "output.weight" in saved and "layers.1.moe.experts.w2" in saved
    assert not any(".wq." in k or "lm_head" in k for k in saved)


def test_head_dim_comes_from_q_norm():
    _, arch = plan_of(config_of("dense_tied"), titan_state("dense_tied"))
    assert (arch.head_dim, arch.n_heads, arch.n_kv_heads) == (32, 4, 2)
    assert arch.dim // arch.n_heads == 16


def test_each_expert_is_its_own_rows_of_the_stacked_tensor():
    """Expert e of ``[E, F, D]`` is rows [e * F, (e + 1) * F): one piece each, so the engine
    streams a stacked tensor in windows and never needs it whole."""
    plan, arch = plan_of(config_of("moe"), titan_state("moe"))
    experts = [t for t in plan.tensors if ".mlp.experts." in t.name]
    assert len(experts) == arch.n_layers * arch.n_experts * 3
    stacked = {
        "gate_proj": ("w1_EFD", arch.moe_hidden_dim),
        "up_proj": ("w3_EFD", arch.moe_hidden_dim),
        "down_proj": ("w2_EDF", arch.dim),
    }
    for tensor in experts:
        _, _, layer, _, _, expert, proj, _ = tensor.name.split(".")
        key, rows = stacked[proj]
        (piece,) = tensor.pieces
        assert piece.source == f"layers.{layer}.moe.routed_experts.inner_experts.{key}"
        assert (piece.src_start, piece.src_stop, piece.dst_start) == (
            int(expert) * rows,
            (int(expert) + 1) * rows,
            0,
        )
        assert row_shape(tensor.shape)[0] == rows


# -------------------------------------------------------------------- the expert bias


def with_bias(variant: str, seed: int = 5) -> dict[str, torch.Tensor]:
    state = titan_state(variant)
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in state if k.endswith("expert_bias_E")]:
        state[key] = 1e-3 * torch.randn(state[key].shape, generator=gen)
    return state


def test_a_zero_expert_bias_is_dropped_and_said_so():
    plan, _ = plan_of(config_of("moe"), titan_state("moe"))
    dropped = {d.key: d.reason for d in plan.dropped}
    for layer in range(2):
        assert "all zero" in dropped[f"layers.{layer}.moe.expert_bias_E"]


@pytest.mark.parametrize("era", ["0.3.0", "v0.2.2"])
def test_a_non_zero_expert_bias_is_an_error(era):
    state = with_bias("moe")
    saved = state if era == "0.3.0" else in_era(state, era, "moe")
    with pytest.raises(ConversionError) as error:
        plan_of(config_of("moe"), saved)
    said = str(error.value)
    largest = max(v.abs().max().item() for k, v in state.items() if k.endswith("bias_E"))
    assert f"largest |bias| {largest:.6g}" in said
    assert "route tokens differently" in said
    assert "experiment.model.accept_expert_bias=true" in said
    assert "Nothing was written" in said
    assert "\n" not in said


def test_accept_expert_bias_drops_it_with_each_layers_size():
    state = with_bias("moe")
    plan, _ = plan_of(config_of("moe", accept_expert_bias=True), state)
    dropped = {d.key: d.reason for d in plan.dropped}
    for layer in range(2):
        key = f"layers.{layer}.moe.expert_bias_E"
        assert f"max |bias| {state[key].abs().max().item():.6g} in this layer" in dropped[key]
        assert "routes tokens without it" in dropped[key]
    assert any("accept_expert_bias=true" in line for line in plan.assumptions)
    # The weights are unchanged by it.
    ours = carry_out(plan, state)
    assert all(torch.equal(ours[k], v) for k, v in to_hf("moe", state).items())


@pytest.mark.parametrize("variant", ["dense_tied", "moe"])
def test_settings_no_tensor_holds_are_assumptions(variant):
    """RoPE's base, the norm's epsilon, the context length and a MoE model's routing change
    the logits and are in no saved tensor."""
    plan, arch = plan_of(config_of(variant), titan_state(variant))
    [said] = plan.assumptions
    stated = f"norm_eps={arch.norm_eps}, rope_theta={arch.rope_theta}, max_seq_len="
    assert said.startswith(stated), said
    routing = f"top_k={arch.top_k}, route_norm=true are taken from the config"
    assert (routing in said) == (variant == "moe"), said
    assert ("top_k" in said) == (variant == "moe"), said


def test_a_saved_token_count_is_dropped():
    state = titan_state("moe")
    state["layers.0.moe.tokens_per_expert_E"] = torch.arange(16.0)
    plan, _ = plan_of(config_of("moe"), state)
    dropped = {d.key: d.reason for d in plan.dropped}
    assert "load-balancing statistic" in dropped["layers.0.moe.tokens_per_expert_E"]


# -------------------------------------------------------------------- refusals


@pytest.mark.parametrize("naming", ["meta", "torchtune"])
def test_pt_formats_are_refused_pointing_to_hf(naming):
    with pytest.raises(ConversionError) as error:
        plan_of(config_of("moe"), titan_state("moe"), naming=naming)
    said = str(error.value)
    assert f"output_format={naming} cannot hold a qwen3 model" in said
    assert "torchtune 0.6.1 has no qwen3 model builder" in said
    assert said.endswith("Choose output_format=hf.")


@pytest.mark.parametrize(
    "variant, fields, expected",
    [
        ("dense_tied", {"head_dim": 16}, "head_dim=16 (the weights say 32)"),
        ("dense_tied", {"n_heads": 8}, "n_heads=8 (the weights say 4)"),
        ("dense_tied", {"n_kv_heads": 4}, "n_kv_heads=4 (the weights say 2)"),
        ("dense_tied", {"hidden_dim": 3072}, "hidden_dim=3072 (the weights say 160)"),
        ("dense_tied", {"n_experts": 16}, "n_experts=16: the checkpoint has no mixture-of"),
        ("moe", {"n_experts": 64}, "n_experts=64 (the weights say 16)"),
        ("moe", {"moe_hidden_dim": 768}, "moe_hidden_dim=768 (the weights say 48)"),
        ("moe", {"hidden_dim": 3072}, "hidden_dim=3072: the checkpoint has no dense feed"),
        ("moe", {"dense_layers": [1]}, "dense_layers=[1] (the weights say [])"),
        ("moe_mixed", {"dense_layers": []}, "dense_layers=[] (the weights say [1])"),
        ("moe", {"dim": 256}, "dim=256 (the weights say 64)"),
        ("moe", {"top_k": None}, "experiment.model.top_k is not set"),
        ("moe", {"top_k": 17}, "top_k=17 exceeds the checkpoint's 16 experts"),
    ],
)
def test_stated_fields_that_contradict_the_shapes_are_errors(variant, fields, expected):
    config = config_of(variant)
    for name, value in fields.items():
        setattr(config, name, value)
    with pytest.raises(ConversionError) as error:
        plan_of(config, titan_state(variant))
    assert expected in str(error.value)


def test_a_mixed_model_lists_its_dense_layers():
    _, arch = plan_of(config_of("moe_mixed"), titan_state("moe_mixed"))
    assert arch.dense_layers == [1] and arch.hidden_dim == 160 and arch.n_experts == 16
    written = QWEN3.hf_config(arch)
    assert written["mlp_only_layers"] == [1] and written["intermediate_size"] == 160


def test_a_key_no_era_explains_is_an_error():
    state = titan_state("moe")
    state["layers.0.moe.shared_experts.w1.weight"] = torch.zeros(8, 64)
    with pytest.raises(ConversionError, match="layers.0.moe.shared_experts.w1.weight"):
        plan_of(config_of("moe"), state)


def test_weights_the_model_has_no_place_for_are_an_error():
    """transformers loads a checkpoint without the weights its config has no place for (it
    lists them as unexpected): a MoE layer that also has a dense feed-forward, whose config
    makes it dense, or experts in a dense model, would load without them."""
    moe, dense = titan_state("moe_mixed"), titan_state("dense_tied")
    both = {**moe, **{k.replace("layers.1.", "layers.0."): v for k, v in moe.items()
                      if k.startswith("layers.1.feed_forward.")}}  # fmt: skip
    with pytest.raises(ConversionError, match=r"no place for: .*layers\.0\.moe\.routed_experts"):
        plan_of(config_of("moe_mixed"), both)
    experts = {k.replace("layers.0.", "layers.1."): v for k, v in moe.items()
               if k.startswith("layers.0.moe.routed_experts.")}  # fmt: skip
    with pytest.raises(ConversionError, match=r"no place for: .*layers\.1\.moe\.routed_experts"):
        plan_of(config_of("dense_tied"), {**dense, **experts})


def test_layers_of_different_sizes_are_an_error():
    state = titan_state("moe")
    state["layers.1.moe.router.gate.weight"] = torch.zeros(8, 64)
    with pytest.raises(ConversionError, match="layers of .* differ in size"):
        plan_of(config_of("moe"), state)


def test_a_missing_weight_is_named():
    state = titan_state("moe")
    del state["layers.1.attention.k_norm.weight"]
    with pytest.raises(ConversionError, match=r"lacks model weights: layers\.1\.attention\.k_norm"):
        plan_of(config_of("moe"), state)


def test_a_qwen3_checkpoint_with_a_llama3_preset_names_qwen3():
    from converter.models.llama3 import Llama3Config

    llama = Llama3Config(n_heads=4, n_kv_heads=2)
    state = titan_state("dense_tied")
    tensors = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    with pytest.raises(ConversionError) as error:
        build_plan(
            FAMILIES["llama3"], llama, tensors, [], "meta", True, None, state.get, "step-3",
            FAMILIES.values(),
        )  # fmt: skip
    assert "They are the keys of a qwen3 model" in str(error.value)
    assert "experiment/model=qwen3/<flavor>" in str(error.value)


def test_a_stray_key_another_family_knows_does_not_name_that_family():
    """A qwen3 save with a stray freqs_cis buffer (a key llama3 knows): the error names the
    key, not llama3, whose keys the rest of the model is not."""
    state = titan_state("moe")
    state["freqs_cis"] = torch.zeros(16, 8)
    with pytest.raises(ConversionError, match=r"explains \(closest: qwen3 .*\): freqs_cis\.") as e:
        plan_of(config_of("moe"), state)
    assert "llama3 model" not in str(e.value)


def test_lora_adapters_are_named_as_such():
    """Unmerged LoRA factors beside the base weights: said to be adapters to merge first,
    not another model family."""
    state = titan_state("dense_tied")
    state["layers.0.attention.wq.lora_a.weight"] = torch.zeros(4, 64)
    state["layers.0.attention.wq.lora_b.weight"] = torch.zeros(64, 4)
    with pytest.raises(ConversionError, match="layers.0.attention.wq.lora_a.weight") as e:
        plan_of(config_of("dense_tied"), state)
    assert "Some are LoRA adapter weights (lora_a, lora_b)" in str(e.value)
    assert "this converter does not merge adapters" in str(e.value)


def test_a_llama3_checkpoint_with_a_qwen3_preset_is_not_mistaken_for_qwen3():
    """llama3's keys are a subset of qwen3's; its missing q_norm says it is not qwen3."""
    from tests.peers import titan_writer

    with torch.device("meta"):
        llama = titan_writer.model_config("debugmodel").build()
    state = dict(llama.state_dict())
    with pytest.raises(ConversionError) as error:
        plan_of(Qwen3Config(), state)
    said = str(error.value)
    assert "q_norm" in said and "llama3" in said


def test_training_state_is_dropped_and_makes_a_full_checkpoint():
    plan, _ = plan_of(config_of("moe"), titan_state("moe"), extra=TRAINING)
    assert not plan.weights_only
    assert {d.key: d.reason for d in plan.dropped}[next(iter(TRAINING))].startswith("optimizer")
