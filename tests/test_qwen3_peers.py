"""qwen3 checkpoints that torchtitan 0.3.0 really wrote (its CheckpointManager, two FSDP2 ranks,
``tests/peers/qwen3_writer.py``), and the same weights saved in every older layout, held to
torchtitan's own ``Qwen3StateDictAdapter.to_hf`` and to transformers' ``Qwen3ForCausalLM`` /
``Qwen3MoeForCausalLM``.

Without the hf output format: the refusals through ``convert.py``; every saved layout planned
from its real DCP index and read with the converter's reader, bit for bit against ``to_hf``;
and the ``config.json`` the family writes, beside torchtitan's own export of the same weights,
loaded by transformers and held to torchtitan's logits. With the hf format (branch ``hf``):
the converter's own outputs through ``convert.py``, against the same (skipped until then).

Tolerances. Dense: max |Δlogit| below 1e-4 (float32 arithmetic; measured 1e-6). MoE:
torchtitan runs the experts in bfloat16 (``torch._grouped_mm``) even for float32 weights, and
bfloat16 rounding may flip a near-tie in the router's top-k for a rare token, so the check is
statistical: the mean |Δ| below 5e-3 and at most 2% of the tokens off by more than 0.02
anywhere (measured: mean |Δ| 3e-4 to 5e-4, and 1 token of 128 off by 0.088 on the float32
checkpoint). A wrong ``norm_topk_prob`` gives a mean |Δ| of 0.03 and every token off; experts in
the wrong order (reversed, or sorted as strings) 0.05 and every token off; the tests show that
the check fails for them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from torch.distributed.checkpoint import FileSystemReader

from converter.models import FAMILIES
from converter.models.base import TRAINING_STATE, build_plan
from converter.models.qwen3 import Qwen3Config
from converter.sources.dcp import DcpIndex
from converter.sources.reader import TensorReader
from converter.sources.storage import LocalStorage
from tests.conftest import REPO
from tests.peers import hf_loader, qwen3_writer, titan_writer

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

QWEN3 = FAMILIES["qwen3"]
ERAS = tuple(qwen3_writer.ERAS)
RUNS = {
    "dense": dict(variant="dense_tied", export_dtype="bfloat16", eras=ERAS),
    "moe": dict(variant="moe", export_dtype="bfloat16", eras=ERAS),
    "mixed": dict(variant="moe_mixed", export_dtype="float32"),
    "biased": dict(variant="moe", export_dtype="float32", expert_bias="trained"),
}
DENSE_TOL = 1e-4
MOE_MEAN_TOL, MOE_TOKEN_TOL, MOE_TOKENS_OFF = 5e-3, 0.02, 0.02


@pytest.fixture(scope="session")
def qwen3_run(tmp_path_factory):
    """Real qwen3 checkpoints, written by torchtitan 0.3.0's CheckpointManager on two FSDP2
    ranks (tests/peers/qwen3_writer.py) once per session for each set of arguments: a function
    ``(variant, export_dtype, expert_bias, eras) -> (model.json's info, reference logits)``."""
    written: dict[tuple, tuple[dict, dict]] = {}

    def run(
        variant: str, export_dtype: str = "float32", expert_bias: str = "zero", eras=()
    ) -> tuple[dict, dict]:
        key = (variant, export_dtype, expert_bias, tuple(eras))
        if key not in written:
            dump = tmp_path_factory.mktemp(f"qwen3_{variant}_{expert_bias}")
            info = qwen3_writer.write_checkpoints(
                dump, variant, export_dtype, expert_bias=expert_bias, eras=tuple(eras)
            )
            written[key] = info, titan_writer.load_reference(dump)
        return written[key]

    return run


def layouts(info: dict) -> dict[str, str]:
    """The checkpoint folder of each layout in a run: torchtitan's own, then the older ones."""
    return {"0.3.0": f"{info['dump']}/checkpoint", **info["era_dirs"]}


def model_overrides(info: dict) -> list[str]:
    """What a user states for a model without a preset: the rest the shapes give."""
    return [
        "experiment/model=qwen3",
        f"experiment.model.tied_embeddings={str(info['tied']).lower()}",
        f"experiment.model.top_k={info['top_k'] if info['top_k'] else 'null'}",
        f"experiment.model.norm_eps={info['norm_eps']}",
        f"experiment.model.rope_theta={info['rope_theta']}",
        f"experiment.model.max_seq_len={info['max_seq_len']}",
    ]


def convert(info: dict, checkpoint_dir: str, output: Path, *overrides: str):
    """One run of convert.py; its Hydra folder beside the output's folder."""
    return subprocess.run(
        [
            sys.executable,
            "convert.py",
            "experiment=debug",
            f"experiment.checkpoint_dir={checkpoint_dir}",
            f"experiment.output={output}",
            f"hydra.run.dir={output.parent.parent / 'hydra'}",
            *model_overrides(info),
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def saved_weights(step_dir: str) -> dict[str, torch.Tensor]:
    """The model's tensors as torchtitan saved them, read with torch's own DCP loader."""
    keys = [
        k
        for k in FileSystemReader(step_dir).read_metadata().state_dict_metadata
        if k.split(".", 1)[0] not in TRAINING_STATE
    ]
    return titan_writer.read_saved_model_weights(step_dir, keys)


def user_config(info: dict, **fields) -> Qwen3Config:
    return Qwen3Config(
        tied_embeddings=info["tied"],
        top_k=info["top_k"],
        norm_eps=info["norm_eps"],
        rope_theta=info["rope_theta"],
        max_seq_len=info["max_seq_len"],
        **fields,
    )


def plan_and_read(step_dir: str, config: Qwen3Config):
    """The plan of the real DCP index, and its output tensors read with the converter's
    reader, each piece's rows put in place (what the engine streams, done whole here)."""
    index = DcpIndex(LocalStorage(str(Path(step_dir).parent)), step_dir)
    reader = TensorReader(index)
    plan, arch = build_plan(
        QWEN3,
        config,
        {k: (e.shape, e.dtype) for k, e in index.tensors.items()},
        index.byte_entries,
        "hf",
        False,
        None,
        lambda key: reader.read_tensor(index.tensors[key]),
        step_dir,
        FAMILIES.values(),
    )
    whole = {key: reader.read_tensor(index.tensors[key]) for key in plan.sources}
    out = {}
    for tensor in plan.tensors:
        into = torch.empty(tensor.shape, dtype=tensor.dtype)
        rows = into.view(-1, tensor.shape[-1]) if into.dim() > 1 else into.view(-1, 1)
        for p in tensor.pieces:
            source = whole[p.source].reshape(-1, rows.shape[1])
            rows[p.dst_start : p.dst_start + p.src_stop - p.src_start] = source[
                p.src_start : p.src_stop
            ]
        out[tensor.name] = into
    return plan, arch, out


def logit_check(info: dict, got: torch.Tensor, want: torch.Tensor) -> tuple[bool, str]:
    """Whether ``got`` is torchtitan's ``want`` up to float32 (dense) or the bfloat16 of
    torchtitan's experts (MoE, see the module docstring), and the figures."""
    diff = (got - want).abs()
    if not info["n_experts"]:
        return diff.max().item() < DENSE_TOL, f"max |Δ| {diff.max().item():.2e}"
    mean = diff.mean().item()
    off = (diff.amax(-1) > MOE_TOKEN_TOL).float().mean().item()
    said = f"mean |Δ| {mean:.2e}, tokens off by > {MOE_TOKEN_TOL}: {off:.1%}, max {diff.max():.3f}"
    return mean < MOE_MEAN_TOL and off <= MOE_TOKENS_OFF, said


# -------------------------------------------------------------------- refusals, through convert.py


@pytest.mark.parametrize("output_format", ["meta", "torchtune"])
def test_pt_formats_are_refused_through_convert_py(qwen3_run, tmp_path, output_format):
    info, _ = qwen3_run(**RUNS["moe"])
    output = tmp_path / "out" / "model.pt"
    run = convert(info, layouts(info)["0.3.0"], output, f"output_format={output_format}")
    assert run.returncode == 1, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, run.stderr[-2000:]
    assert f"output_format={output_format} cannot hold a qwen3 model" in errors[0]
    assert "torchtune 0.6.1 has no qwen3 model builder" in errors[0]
    assert errors[0].endswith("Choose output_format=hf.")
    assert "Traceback" not in run.stderr
    assert not output.parent.exists()


def test_a_non_zero_expert_bias_stops_convert_py(qwen3_run, tmp_path):
    """One paragraph, exit 1, nothing written; the switch lets the same checkpoint past it
    (to the next check: with no hf format here, the .pt refusal)."""
    info, _ = qwen3_run(**RUNS["biased"])
    saved = saved_weights(info["step_dirs"]["step-3"])
    largest = max(v.abs().max().item() for k, v in saved.items() if k.endswith("expert_bias_E"))
    assert largest > 0, "torchtitan's load-balancing hook trained the bias"
    output = tmp_path / "out" / "model.pt"
    run = convert(info, layouts(info)["0.3.0"], output)
    assert run.returncode == 1, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, run.stderr[-2000:]
    assert (
        "step-3 holds a non-zero expert_bias_E in 2 of its mixture-of-experts layers" in (errors[0])
    )
    assert f"largest |bias| {largest:.6g}" in errors[0]
    assert "would route tokens differently" in errors[0]
    assert "experiment.model.accept_expert_bias=true" in errors[0]
    assert "Traceback" not in run.stderr
    assert not output.parent.exists()

    accepted = convert(
        info, layouts(info)["0.3.0"], output, "experiment.model.accept_expert_bias=true"
    )
    assert accepted.returncode == 1
    assert "expert_bias_E" not in accepted.stderr
    assert "output_format=meta cannot hold a qwen3 model" in accepted.stderr
    assert not output.parent.exists()


# -------------------------------------------------------------------- every layout, bit for bit


@pytest.mark.parametrize("step", ["step-2", "step-3"])
@pytest.mark.parametrize("layout", ["0.3.0", *ERAS])
@pytest.mark.parametrize("run", ["dense", "moe"])
def test_each_saved_layout_reads_as_torchtitans_to_hf(qwen3_run, run, layout, step):
    """torchtitan's to_hf of the weights it saved, against the plan of each layout's real DCP
    index, read with the converter's reader (full float32 step 2, model-only bfloat16 step 3)."""
    info, _ = qwen3_run(**RUNS[run])
    expected = hf_loader.titan_to_hf(
        qwen3_writer.model_config(info["variant"]), saved_weights(info["step_dirs"][step])
    )
    plan, arch, ours = plan_and_read(f"{layouts(info)[layout]}/{step}", user_config(info))
    assert sorted(ours) == sorted(expected)
    for name, tensor in expected.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name
    assert plan.weights_only == (step == "step-3")
    dropped = {d.key: d.reason for d in plan.dropped}
    if info["n_experts"]:
        plain = layout != "0.3.0" and qwen3_writer.ERAS[layout].experts == "plain"
        bias = "layers.0.moe.expert_bias" + ("" if plain else "_E")
        assert "all zero" in dropped[bias]
        assert (arch.n_experts, arch.moe_hidden_dim) == (info["n_experts"], info["moe_hidden_dim"])
    assert (arch.head_dim, arch.n_heads, arch.n_kv_heads) == (
        info["head_dim"],
        info["n_heads"],
        info["n_kv_heads"],
    )


# -------------------------------------------------------------------- config.json and logits


@pytest.mark.parametrize("step", ["step-2", "step-3"])
@pytest.mark.parametrize("run", ["dense", "moe", "mixed"])
def test_the_config_json_with_torchtitans_export_gives_torchtitans_logits(
    qwen3_run, tmp_path, run, step
):
    """The family's config.json, beside torchtitan's own export of the same weights: what
    transformers loads gives torchtitan's logits (``logits_saved``: on the weights as saved)."""
    info, ref = qwen3_run(**RUNS[run])
    step_dir = info["step_dirs"][step]
    _, arch, _ = plan_and_read(step_dir, user_config(info))
    folder = hf_loader.titan_hf_folder(
        tmp_path / "hf",
        qwen3_writer.model_config(info["variant"]),
        saved_weights(step_dir),
        QWEN3.hf_config(arch),
    )
    logits = hf_loader.hf_logits(folder, ref["tokens"])
    ok, said = logit_check(info, logits, ref["steps"][step]["logits_saved"])
    print(f"{info['variant']} {step}: {said}")
    assert ok, said


@pytest.mark.parametrize("wrong", ["norm_topk_prob", "experts reversed", "experts as strings"])
def test_the_moe_tolerance_catches_a_wrong_router_or_expert_order(qwen3_run, tmp_path, wrong):
    """On the float32 checkpoint, whose correct export shows a flipped near-tie (the hardest
    case for the check): a wrong renormalisation or a wrong expert order fails it."""
    info, ref = qwen3_run(**RUNS["moe"])
    step_dir = info["step_dirs"]["step-2"]
    _, arch, _ = plan_and_read(step_dir, user_config(info))
    config, weights = QWEN3.hf_config(arch), saved_weights(step_dir)
    experts = info["n_experts"]
    order = {
        "experts reversed": list(reversed(range(experts))),
        "experts as strings": sorted(range(experts), key=str),
    }
    if wrong == "norm_topk_prob":
        config["norm_topk_prob"] = False
    else:
        weights = {k: v[order[wrong]] if ".inner_experts." in k else v for k, v in weights.items()}
    folder = hf_loader.titan_hf_folder(
        tmp_path / "hf", qwen3_writer.model_config(info["variant"]), weights, config
    )
    ok, said = logit_check(info, hf_loader.hf_logits(folder, ref["tokens"]), step2_logits(ref))
    print(f"{wrong}: {said}")
    assert not ok, said


def step2_logits(ref: dict) -> torch.Tensor:
    return ref["steps"]["step-2"]["logits_saved"]


# -------------------------------------------------------------------- the hf format (phase 2)


def convert_sweep(info: dict, out_root: Path, *overrides: str) -> list[Path]:
    """One multirun of convert.py over every layout of a run, steps 2 and 3, into hf folders;
    returns them."""
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "convert.py"),
            "-m",
            "experiment=debug",
            "experiment.checkpoint_dir=" + ",".join(layouts(info).values()),
            "experiment.step=2,3",
            "experiment.export_dtype=keep",
            "output_format=hf",
            f"experiment.output={out_root}/${{hydra:job.num}}",
            f"hydra.sweep.dir={out_root / 'sweep'}",
            *model_overrides(info),
            *overrides,
        ],
        cwd=out_root,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return sorted(p for p in out_root.iterdir() if p.name.isdigit())


def manifest_of(folder: Path) -> dict:
    return json.loads(next(folder.glob("*manifest.json")).read_text())


@pytest.mark.parametrize("run", ["dense", "moe"])
def test_hf_outputs_are_torchtitans_to_hf_and_give_its_logits(qwen3_run, tmp_path, run):
    info, ref = qwen3_run(**RUNS[run])
    folders = convert_sweep(info, tmp_path)
    assert len(folders) == 2 * len(layouts(info))
    for folder in folders:
        manifest = manifest_of(folder)
        step = f"step-{manifest['source']['step']}"
        expected = hf_loader.titan_to_hf(
            qwen3_writer.model_config(info["variant"]), saved_weights(info["step_dirs"][step])
        )
        ours = hf_loader.hf_tensors(folder)
        assert sorted(ours) == sorted(expected), folder
        for name, tensor in expected.items():
            assert torch.equal(ours[name], tensor), (folder, name)
        config = json.loads((folder / "config.json").read_text())
        assert config["head_dim"] == info["head_dim"]
        assert config["tie_word_embeddings"] == info["tied"]
        if info["n_experts"]:
            assert config["num_experts"] == info["n_experts"]
            assert config["num_experts_per_tok"] == info["top_k"]
            assert config["norm_topk_prob"] is True
            assert any("all zero" in why for why in manifest["dropped"].values())
        ok, said = logit_check(
            info, hf_loader.hf_logits(folder, ref["tokens"]), ref["steps"][step]["logits_saved"]
        )
        print(f"{info['variant']} {manifest['source']['layout']} {step}: {said}")
        assert ok, (folder, said)


def test_the_tolerance_catches_a_wrong_router_or_expert_order_in_an_hf_output(qwen3_run, tmp_path):
    from safetensors.torch import save_file

    info, ref = qwen3_run(**RUNS["moe"])
    output = tmp_path / "out" / "model"
    run = convert(
        info,
        layouts(info)["0.3.0"],
        output,
        "output_format=hf",
        "experiment.step=2",
        "experiment.export_dtype=keep",  # float32, as the reference logits' weights
    )
    assert run.returncode == 0, run.stderr[-2000:]
    ok, said = logit_check(info, hf_loader.hf_logits(output, ref["tokens"]), step2_logits(ref))
    assert ok, said
    config = json.loads((output / "config.json").read_text())
    (output / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}))
    assert not logit_check(info, hf_loader.hf_logits(output, ref["tokens"]), step2_logits(ref))[0]
    (output / "config.json").write_text(json.dumps(config))
    # The experts renumbered, into one file (a shard index would name the old files).
    last = info["n_experts"] - 1
    tensors = hf_loader.hf_tensors(output)
    for path in [*output.glob("*.safetensors"), *output.glob("*.safetensors.index.json")]:
        path.unlink()
    save_file({_renumbered(k, last): v for k, v in tensors.items()}, output / "model.safetensors")
    assert not logit_check(info, hf_loader.hf_logits(output, ref["tokens"]), step2_logits(ref))[0]


def _renumbered(name: str, last: int) -> str:
    """Expert e named as expert last - e."""
    parts = name.split(".")
    if "experts" in parts:
        i = parts.index("experts") + 1
        parts[i] = str(last - int(parts[i]))
    return ".".join(parts)


def test_accept_expert_bias_converts_and_records_each_layers_bias(qwen3_run, tmp_path):
    info, _ = qwen3_run(**RUNS["biased"])
    saved = saved_weights(info["step_dirs"]["step-3"])
    output = tmp_path / "out" / "model"
    run = convert(
        info,
        layouts(info)["0.3.0"],
        output,
        "output_format=hf",
        "experiment.model.accept_expert_bias=true",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "accept_expert_bias=true" in run.stderr
    manifest = manifest_of(output)
    for layer in range(info["n_layers"]):
        key = f"layers.{layer}.moe.expert_bias_E"
        largest = saved[key].float().abs().max().item()
        assert f"max |bias| {largest:.6g} in this layer" in manifest["dropped"][key]
        # Read for that check, not converted: its digest is recorded as a converted one's is.
        data = saved[key].contiguous().view(torch.uint8).numpy()
        recorded = manifest["source"]["tensors"][key]
        assert recorded == {"bytes": data.nbytes, "xxh3_128": xxhash.xxh3_128_hexdigest(data)}


def test_stacked_experts_larger_than_the_budget_stream_in_windows(qwen3_run, tmp_path, monkeypatch):
    """Each stacked expert tensor (64 x 512 x 64 float32, 8 MiB) is eight times batch_mb=1:
    the engine's own pool never holds more than the budget, it lends many windows per stacked
    tensor, and the folder is still torchtitan's to_hf bit for bit."""
    from converter import engine, job
    from tests.conftest import compose
    from tests.test_memory import _CountingPool

    info, _ = qwen3_run(variant="moe_wide")
    stacked = info["n_experts"] * info["moe_hidden_dim"] * info["dim"] * 4
    assert stacked >= 8 << 20
    monkeypatch.setattr(engine, "BufferPool", _CountingPool)
    _CountingPool.instances.clear()
    output = tmp_path / "out"
    cfg = compose(
        [
            "experiment=debug",
            f"experiment.checkpoint_dir={layouts(info)['0.3.0']}",
            f"experiment.output={output}",
            "experiment.step=3",
            "experiment.export_dtype=keep",
            "output_format=hf",
            "batch_mb=1",
            "workers=2",
            *model_overrides(info),
        ]
    )
    result = job.run(cfg)
    assert result.status == "converted", result.error
    (pool,) = _CountingPool.instances
    assert 0 < pool.peak <= pool.budget == 1 << 20
    # 3 stacked tensors a layer, each in windows of at most a third of a worker's share.
    window = pool.budget // (3 * 2)
    assert pool.loans >= 3 * info["n_layers"] * stacked // window
    expected = hf_loader.titan_to_hf(
        qwen3_writer.model_config(info["variant"]), saved_weights(info["step_dirs"]["step-3"])
    )
    ours = hf_loader.hf_tensors(output)
    assert sorted(ours) == sorted(expected)
    assert all(torch.equal(ours[name], tensor) for name, tensor in expected.items())


def test_a_nan_in_one_expert_is_reported_for_that_experts_tensor(qwen3_run, tmp_path):
    """A window of stacked experts feeds dozens of output tensors, one per expert: a NaN in one
    expert's rows stops the run naming that expert's output tensor, and only it."""
    from converter import job
    from tests.conftest import compose
    from tests.test_faults import overwrite_tensor_bytes

    info, _ = qwen3_run(variant="moe_wide")
    step_dir = tmp_path / "checkpoint" / "step-3"
    shutil.copytree(info["step_dirs"]["step-3"], step_dir)
    key = "layers.0.moe.routed_experts.inner_experts.w1_EFD"
    per_expert = info["moe_hidden_dim"] * info["dim"] * 4  # saved in float32
    # Expert 37: the sixth of the second chunk (FSDP2 shards the 64 experts over two ranks).
    chunks = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata[key].chunks
    assert chunks[1].offsets[0] == 32
    overwrite_tensor_bytes(step_dir, key, b"\xff" * 64, chunk_index=1, at=5 * per_expert)
    output = tmp_path / "out"
    cfg = compose(
        [
            "experiment=debug",
            f"experiment.checkpoint_dir={step_dir.parent}",
            f"experiment.output={output}",
            "experiment.step=3",
            "output_format=hf",
            *model_overrides(info),
        ]
    )
    result = job.run(cfg)
    assert result.status == "failed"
    assert f"{key!r} in {step_dir} holds 16 NaN/Inf values" in result.error
    assert "(output 'model.layers.0.mlp.experts.37.gate_proj.weight')" in result.error
    assert result.error.count("mlp.experts.") == 1
    assert not output.exists()
