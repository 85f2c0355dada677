"""The llama3 family's planner on synthetic tensor tables: every layout era, every naming, and
the checks of stated fields against shapes, with no ranks and no files (seconds).

The key tables come from the demo writer's modules, built on the meta device, not from the
converter's own tables; the expected output names are written out here by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from converter.errors import ConversionError
from converter.models import FAMILIES
from converter.models.base import build_plan
from converter.models.llama3 import Llama3, Llama3Config, _rope_frequencies
from converter.plan import RowOrder
from demo import writer as demo

GQA_TIED = demo.ModelShape(
    dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=96, hidden_dim=160,
    tied_embeddings=True,
)  # fmt: skip
MHA = demo.ModelShape(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=96, hidden_dim=160)
OPTIMIZER = {
    "optimizer.state.layers.0.attention.wq.weight.exp_avg": ((8, 8), torch.float32),
    "lr_scheduler.last_epoch": ((), torch.int64),
}


# Each naming, and whether its format keeps a tied model's head (the Meta checkpointer pops it).
NAMINGS = {"meta": True, "torchtune": False, "hf": False}


def plan(
    shape: demo.ModelShape,
    layout: str,
    naming: str = "meta",
    rope_table: torch.Tensor | None = None,
    **config,
):
    """The plan of a save of ``shape`` in ``layout``: values are zeros, but for a nested
    save's RoPE table (checked against the config), demo.writer's (unscaled) unless given."""
    tensors = {**demo.model_state_shapes(shape, layout), **OPTIMIZER}
    table = demo.rope_table(shape) if rope_table is None else rope_table
    stated = dict(
        n_heads=shape.n_heads,
        n_kv_heads=shape.n_kv_heads,
        tied_embeddings=shape.tied_embeddings,
        rope_scaling=not demo.LAYOUTS[layout].nested,
    )

    def read(key: str) -> torch.Tensor:
        if key.endswith("freqs_cis"):
            return table
        return torch.zeros(tensors[key][0])

    return build_plan(
        Llama3(),
        Llama3Config(**{**stated, **config}),
        tensors,
        ["dataloader.dp_rank_0"],
        naming,
        NAMINGS[naming],
        torch.bfloat16,
        read,
        "step-1",
    )


META_LAYER = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "attention_norm",
              "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]  # fmt: skip
HF_LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.down_proj",
            "mlp.up_proj"]  # fmt: skip


@pytest.mark.parametrize("layout", list(demo.LAYOUTS))
def test_every_era_plans_the_same_model(layout):
    """Whatever the era, the same output: Meta's names, in order, every source key placed or
    dropped with its reason, the tied head kept for the Meta checkpointer."""
    p, arch = plan(GQA_TIED, layout)
    layers = [f"layers.{i}.{n}.weight" for i in range(2) for n in META_LAYER]
    assert [t.name for t in p.tensors] == [
        "tok_embeddings.weight",
        *layers,
        "norm.weight",
        "output.weight",
    ]
    assert p.layout == layout
    assert (arch.dim, arch.n_layers, arch.vocab_size, arch.hidden_dim, arch.head_dim) == (
        64, 2, 96, 160, 8,
    )  # fmt: skip
    shapes = {t.name: t.shape for t in p.tensors}
    assert shapes["layers.0.attention.wq.weight"] == (64, 64)
    assert shapes["layers.0.attention.wk.weight"] == (16, 64)
    placed = {piece.source for t in p.tensors for piece in t.pieces}
    dropped = {d.key for d in p.dropped}
    tensors = demo.model_state_shapes(GQA_TIED, layout)
    assert placed | dropped == set(tensors) | set(OPTIMIZER) | {"dataloader.dp_rank_0"}
    assert p.tied and all(t.dtype == torch.bfloat16 for t in p.tensors)


def test_fused_qkv_is_split_per_kv_group():
    """[n_kv, n_heads/n_kv + 2, head_dim, dim]: group g's query heads, then its key and value."""
    p, _ = plan(GQA_TIED, "#2937 fuse_qkv")
    pieces = {t.name: t.pieces for t in p.tensors if t.name.startswith("layers.0.attention.w")}
    hd, per_group = 8, 8 // 2 + 2
    wq = [(x.src_start, x.src_stop, x.dst_start) for x in pieces["layers.0.attention.wq.weight"]]
    assert wq == [(0, 4 * hd, 0), (per_group * hd, (per_group + 4) * hd, 4 * hd)]
    wk = [(x.src_start, x.src_stop) for x in pieces["layers.0.attention.wk.weight"]]
    assert wk == [(4 * hd, 5 * hd), ((per_group + 4) * hd, (per_group + 5) * hd)]


@pytest.mark.parametrize("naming", ["torchtune", "hf"])
def test_a_tied_head_is_left_out_where_the_consumer_ties_it(naming):
    p, _ = plan(GQA_TIED, demo.TORCHTITAN_0_3, naming)
    names = [t.name for t in p.tensors]
    assert "output.weight" not in names and "lm_head.weight" not in names
    assert [d.reason for d in p.dropped if d.key == "lm_head.weight"] == [
        "tied embeddings: same values as tok_embeddings.weight"
    ]


def test_hf_names_and_reorders_q_and_k_per_head():
    p, _ = plan(MHA, demo.TORCHTITAN_0_3, "hf")
    by_name = {t.name: t for t in p.tensors}
    layers = [f"model.layers.{i}.{n}.weight" for i in range(2) for n in HF_LAYER]
    expected = ["model.embed_tokens.weight", *layers, "model.norm.weight", "lm_head.weight"]
    assert list(by_name) == expected
    for name, t in by_name.items():
        reordered = {x.reorder for x in t.pieces}
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            assert {(r.order, r.block) for r in reordered} == {(RowOrder.rope_halves, 16)}
        else:
            assert reordered == {None}


def test_rope_halves_is_torchtitans_permutation():
    """The reordering equals torchtitan's ``Llama3StateDictAdapter._permute`` formula."""
    n_heads, hd, dim = 3, 8, 5
    w = torch.randn(n_heads * hd, dim)
    theirs = w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(n_heads * hd, dim)
    ours = torch.empty_like(w)
    RowOrder.rope_halves.copy(w, hd, ours)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "stated, said",
    [
        ({"dim": 32}, "dim=32 (the weights say 64)"),
        ({"n_layers": 3}, "n_layers=3 (the weights say 2)"),
        ({"vocab_size": 97}, "vocab_size=97 (the weights say 96)"),
        ({"hidden_dim": 128}, "hidden_dim=128 (the weights say 160)"),
        ({"head_dim": 16}, "head_dim=16 (the weights say 8)"),
    ],
)
def test_stated_fields_are_checked_against_the_shapes(stated, said):
    with pytest.raises(
        ConversionError, match=rf"contradicts .*{said.replace('(', '.').replace(')', '.')}"
    ):
        plan(GQA_TIED, demo.TORCHTITAN_0_3, **stated)


@pytest.mark.parametrize("layout", [demo.TORCHTITAN_0_3, "#2937 fuse_qkv"])
def test_head_counts_that_contradict_the_shapes_fail(layout):
    with pytest.raises(ConversionError, match="n_heads=3"):
        plan(GQA_TIED, layout, n_heads=3, n_kv_heads=1)


def test_unknown_and_missing_keys_fail_naming_them():
    tensors = demo.model_state_shapes(MHA, demo.TORCHTITAN_0_3)

    def run(table):
        return build_plan(
            Llama3(), Llama3Config(n_heads=4), table, [], "meta", True, None,
            lambda k: torch.zeros(1), "step-1",
        )  # fmt: skip

    with pytest.raises(ConversionError, match="no known torchtitan layout.*vision.proj.weight"):
        run({**tensors, "vision.proj.weight": ((4, 4), torch.float32)})
    del tensors["layers.1.feed_forward.w2.weight"]
    with pytest.raises(ConversionError, match="lacks model weights: layers.1.feed_forward.w2"):
        run(tensors)


def run_plan(tensors, byte_entries=(), naming="meta", **config):
    """The plan of the MHA model's keys as ``tensors`` gives them, all families known."""
    return build_plan(
        Llama3(), Llama3Config(**{"n_heads": 4, **config}), tensors, list(byte_entries), naming,
        True, None, lambda k: torch.zeros(tensors[k][0]), "step-1", FAMILIES.values(),
    )  # fmt: skip


def test_a_layer_index_spelled_otherwise_is_unknown():
    """ "01" is not torchtitan's spelling of layer 1: were it read as one, its tensor would take
    the place of the real layer 1's in the output."""
    tensors = demo.model_state_shapes(MHA, demo.TORCHTITAN_0_3)
    stray = {"layers.01.feed_forward.w1.weight": tensors["layers.1.feed_forward.w1.weight"]}
    with pytest.raises(ConversionError, match=r"no known torchtitan layout.*: layers\.01\."):
        run_plan({**tensors, **stray})


def test_a_layer_of_other_sizes_fails():
    """The architecture is read from layer 0, and the config.json or torchtune builder gives
    every layer its sizes: a wider layer 1 would load into neither."""
    tensors = demo.model_state_shapes(MHA, demo.TORCHTITAN_0_3)
    wider = {
        "layers.1.feed_forward.w1.weight": ((192, 64), torch.float32),
        "layers.1.feed_forward.w2.weight": ((64, 192), torch.float32),
        "layers.1.feed_forward.w3.weight": ((192, 64), torch.float32),
    }
    with pytest.raises(ConversionError, match=r"layers of step-1 differ in size.*\(192, 64\)"):
        run_plan({**tensors, **wider})


def test_an_integer_weight_is_refused():
    tensors = demo.model_state_shapes(MHA, demo.TORCHTITAN_0_3)
    tensors["layers.0.feed_forward.w1.weight"] = ((160, 64), torch.int8)
    with pytest.raises(ConversionError, match="'layers.0.feed_forward.w1.weight' as int8"):
        run_plan(tensors)


def test_a_stray_key_names_itself_alone():
    """A stray "model." key does not make a flat save's every key unknown (nor crash on the
    family that was never saved nested), and a stray non-model entry is not blamed on the
    family: qwen3's tables explain llama3's keys too."""
    tensors = demo.model_state_shapes(MHA, demo.TORCHTITAN_0_3)
    with pytest.raises(ConversionError, match=r"explains \(closest: llama3 .*\): model\.foo\."):
        run_plan({**tensors, "model.foo": ((3,), torch.float32)})
    with pytest.raises(ConversionError, match=r"\): layers\.0\._extra_state\. This") as e:
        run_plan(tensors, byte_entries=["layers.0._extra_state"])
    assert "qwen3 model" not in str(e.value)


def test_heads_not_of_dim_over_n_heads_get_no_torchtune_builder():
    """torchtitan 0.3.0's attention takes a head_dim of its own (its to_hf: ``attn.head_dim or
    dim // n_heads``); torchtune's llama3 builders make heads dim // n_heads wide."""
    tensors = demo.model_state_shapes(MHA, demo.TORCHTITAN_0_3)
    for i in range(MHA.n_layers):
        for w in ("wq", "wk", "wv"):
            tensors[f"layers.{i}.attention.qkv_linear.{w}.weight"] = ((128, 64), torch.float32)
        tensors[f"layers.{i}.attention.wo.weight"] = ((64, 128), torch.float32)
    plan_, arch = run_plan(tensors)
    assert arch.head_dim == 32 and Llama3().hf_config(arch)["head_dim"] == 32
    assert Llama3().torchtune_model(arch) is None
    assert any("not dim // n_heads = 16" in a for a in plan_.assumptions)


def test_a_saved_rope_table_is_checked_against_the_settings():
    """A nested save keeps the RoPE table it trained with (freqs_cis, unscaled then): the
    settings that would compute another are refused, saying which to set; its width confirms
    the head count, which other layouts only assume."""
    nested = "v0.1.0"
    with pytest.raises(ConversionError, match="set experiment.model.rope_scaling=false"):
        plan(GQA_TIED, nested, rope_scaling=True)
    with pytest.raises(ConversionError, match="set the rope_theta and rope_scaling settings"):
        plan(GQA_TIED, nested, rope_theta=10000.0)
    # 4 heads of 16 (1 kv head) have the same shapes as 8 of 8 (2 kv heads); the table does not.
    with pytest.raises(ConversionError, match="heads of 8 values, so the model has n_heads = dim"):
        plan(GQA_TIED, nested, n_heads=4, n_kv_heads=1)
    p, arch = plan(GQA_TIED, nested)
    assert not any("n_heads=" in said or "rope_scaling=" in said for said in p.assumptions)
    [dropped] = [d for d in p.dropped if d.key == "model.freqs_cis"]
    assert "checked against it" in dropped.reason
    # Frequencies a last bit off (computed on a GPU, say), over 128k positions: accepted.
    off = torch.nextafter(_rope_frequencies(arch), torch.tensor(1.0))
    angles = torch.outer(torch.arange(131072, dtype=torch.float32), off)
    plan(GQA_TIED, nested, rope_table=torch.polar(torch.ones_like(angles), angles))


def test_a_nested_save_without_its_rope_table_predates_rope_scaling():
    """Nested saves from #1338 (2025-06-26, no freqs_cis) to #1347 trained before torchtitan
    had RoPE scaling: the presets' scaling is refused for them, as for those with a table."""
    layout = "v0.1.0"
    without = {
        k: v for k, v in demo.model_state_shapes(GQA_TIED, layout).items() if "freqs" not in k
    }
    stated = dict(n_heads=GQA_TIED.n_heads, n_kv_heads=GQA_TIED.n_kv_heads, tied_embeddings=True)
    for scaling in (True, False):
        args = (
            Llama3(),
            Llama3Config(**stated, rope_scaling=scaling),
            {**without, **OPTIMIZER},
            ["dataloader.dp_rank_0"],
            "meta",
            True,
            torch.bfloat16,
            lambda key: torch.zeros(0),
            "step-1",
        )
        if scaling:
            with pytest.raises(ConversionError, match="Set experiment.model.rope_scaling=false"):
                build_plan(*args)
        else:
            p, _ = build_plan(*args)
            assert p.layout == layout and not any("#1839" in a for a in p.assumptions)


@pytest.mark.parametrize(
    "layout, unconfirmed", [("#1347", True), ("#2878", False), (demo.TORCHTITAN_0_3, False)]
)
def test_rope_scaling_is_an_assumption_where_the_layout_spans_its_introduction(layout, unconfirmed):
    """torchtitan #1839 (2025-10-08) turned on RoPE scaling while #1347's flat Meta names were
    saved; that layout keeps no table, so the setting is said to be assumed; the later
    layouts all trained with it."""
    for scaling, advice in ((True, "rope_scaling=false"), (False, "rope_scaling=true")):
        p, _ = plan(MHA, layout, rope_scaling=scaling)
        said = [a for a in p.assumptions if "#1839" in a]
        assert bool(said) == unconfirmed, p.assumptions
        assert all(f"set experiment.model.{advice}" in a for a in said)


@pytest.mark.parametrize("layout", list(demo.LAYOUTS))
def test_settings_no_tensor_holds_are_assumptions(layout):
    """RoPE, the norm's epsilon and the context length change the logits and are in no saved
    tensor, but for a nested save's RoPE table, which confirms RoPE."""
    scaled = not demo.LAYOUTS[layout].nested
    p, _ = plan(MHA, layout, rope_scaling_factor=32.0, norm_eps=1e-6, max_seq_len=4096)
    [said] = [a for a in p.assumptions if "no saved tensor holds them" in a]
    assert said.startswith("norm_eps=1e-06, max_seq_len=4096")
    has_table = "freqs_cis" in "".join(demo.model_state_shapes(MHA, layout))
    rope = "rope_theta=500000.0, rope_scaling=true, rope_scaling_factor=32.0, rope_low_freq_factor"
    assert (rope in said) == (scaled and not has_table), said
    if not scaled and not has_table:
        assert "rope_theta=500000.0, rope_scaling=false are taken" in said


def test_the_torchtune_builder_gets_the_models_rope():
    """llama3_2 (tied) always scales, so unscaled RoPE takes scale_factor 1 (every frequency
    kept); RoPE factors that torchtune's Llama3ScaledRoPE fixes otherwise get no builder."""
    family = Llama3()
    _, tied = plan(GQA_TIED, demo.TORCHTITAN_0_3)
    assert family.torchtune_model(tied)["scale_factor"] == 8.0
    _, unscaled = plan(GQA_TIED, demo.TORCHTITAN_0_3, rope_scaling=False)
    built = family.torchtune_model(unscaled)
    assert built["_component_"] == "torchtune.models.llama3_2.llama3_2"
    assert built["scale_factor"] == 1.0
    _, untied = plan(MHA, demo.TORCHTITAN_0_3, rope_scaling=False)
    assert family.torchtune_model(untied)["_component_"] == "torchtune.models.llama3.llama3"
    p, other = plan(MHA, demo.TORCHTITAN_0_3, rope_high_freq_factor=2.0)
    assert family.torchtune_model(other) is None
    assert any("its llama3 RoPE fixes them at 1, 4 and 8192" in a for a in p.assumptions)


def test_the_rope_frequencies_are_torchtitans():
    """The frequencies the check compares with are those of torchtitan's own llama3 RoPE
    cache (row 1: one position turns each by its frequency), scaled and not, with a wavelength
    in each band of Llama 3.1's scaling: kept, blended and slowed."""
    from torchtitan.models.common.rope import ComplexRoPE

    _, arch = plan(GQA_TIED, demo.TORCHTITAN_0_3)
    context = 400
    settings = dataclasses.replace(arch, rope_original_max_seq_len=context)
    wavelengths = 2 * math.pi / _rope_frequencies(dataclasses.replace(settings, rope_scaling=False))
    assert (wavelengths < context / 4).any() and (wavelengths > context).any()
    assert ((wavelengths > context / 4) & (wavelengths < context)).any()  # blended
    for scaling in (True, False):
        rope = ComplexRoPE.Config(
            dim=arch.head_dim,
            max_seq_len=16,
            theta=arch.rope_theta,
            scaling="llama" if scaling else "none",
            original_max_position_embeddings=context,
        ).build()
        ours = _rope_frequencies(dataclasses.replace(settings, rope_scaling=scaling))
        assert torch.allclose(rope._precompute_cache()[1].angle(), ours, rtol=1e-6, atol=0)
