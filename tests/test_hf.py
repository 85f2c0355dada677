"""``output_format=hf`` on every torchtitan layout era, full and weights-only, held to what
torchtitan 0.3.0's own ``Llama3StateDictAdapter.to_hf`` makes of the same saved weights, and
each safetensors file to what ``safetensors.torch.save_file`` writes from those tensors; the
folder's split, index, config and tokenizer files; and what a run does with a folder already on
disk. The logits of the folder in transformers, torchtune and torchtitan are in test_hf_peers."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader

from converter import job
from converter.formats import FORMATS
from converter.formats.base import Described
from converter.formats.hf import HfOptions, shard_bytes
from converter.manifest import FOLDER_MANIFEST
from converter.plan import OutputTensor, Plan
from demo import writer as demo
from tests.conftest import (
    FULL_STEP,
    VARIANTS,
    WEIGHTS_ONLY_STEP,
    compose,
    layout_overrides,
    make_tokenizer,
    model_overrides,
)
from tests.peers import titan_writer

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TORCHTITAN_0_3 = demo.TORCHTITAN_0_3
# Below the size of a layer's feed-forward weight in float32 (40960 bytes), above a bfloat16
# one's: the layout tests write several shards, some holding one oversized tensor alone.
SMALL_SHARDS = "40KB"
DESCRIBING = {"config.json", "generation_config.json", "titan2tune.torchtune.yaml", FOLDER_MANIFEST}


def expected_hf(saved: dict, shape: demo.ModelShape, export_dtype: str) -> dict:
    """torchtitan 0.3.0's to_hf of the weights as saved (Meta's names, renamed by hand to
    torchtitan 0.3.0's), cast to the export dtype."""
    config = titan_writer.shape_config(shape)
    hf = titan_writer.titan_to_hf(config, titan_writer.meta_to_titan(saved))
    if export_dtype == "keep":
        return hf
    return {k: v.to(DTYPES[export_dtype]) for k, v in hf.items()}


def convert(tmp_path: Path, root: Path, shape, *overrides: str) -> job.JobResult:
    cfg = compose(
        [
            "experiment=debug",
            f"experiment.checkpoint_dir={root}",
            f"experiment.output={tmp_path / 'out' / 'model_hf'}",
            "output_format=hf",
            *model_overrides(shape),
            *overrides,
        ]
    )
    return job.run(cfg)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def manifest(folder: Path) -> dict:
    return json.loads((folder / FOLDER_MANIFEST).read_text())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("layout", list(demo.LAYOUTS))
@pytest.mark.parametrize("kind", ["full", "weights_only"])
@pytest.mark.parametrize("export_dtype", ["bfloat16", "keep"])
def test_layout_equals_torchtitans_to_hf(
    tmp_path, layout_checkpoints, layout, variant, kind, export_dtype
):
    root, shape, saved = layout_checkpoints[layout, variant]
    step = FULL_STEP if kind == "full" else WEIGHTS_ONLY_STEP
    result = convert(
        tmp_path,
        root,
        shape,
        f"experiment.step={step}",
        f"experiment.export_dtype={export_dtype}",
        f"output_format.max_shard_size={SMALL_SHARDS}",
        *layout_overrides(layout),
    )
    assert result.status == "converted", result.error
    folder = Path(result.output)
    expected = expected_hf(saved[step], shape, export_dtype)

    files = shards(folder)
    assert len(files) > 1
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(expected)
    assert sorted(set(index["weight_map"].values())) == [f.name for f in files]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    found = {}
    for file in files:
        tensors = load_file(file)
        assert all(index["weight_map"][k] == file.name for k in tensors)
        # A shard is what safetensors' own save_file writes from the same tensors.
        save_file({k: expected[k] for k in tensors}, tmp_path / "ref.safetensors", {"format": "pt"})
        assert file.read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), file.name
        found |= tensors
    assert sorted(found) == sorted(expected)  # same key set: no lm_head when tied
    for key, want in expected.items():
        assert found[key].dtype == want.dtype and torch.equal(found[key], want), key
    assert {p.name for p in folder.iterdir()} == {
        *(f.name for f in files),
        "model.safetensors.index.json",
        *DESCRIBING,
    }

    recorded = manifest(folder)
    # Every key of the checkpoint is converted or accounted for; the tied head is dropped.
    stored = set(FileSystemReader(root / f"step-{step}").read_metadata().state_dict_metadata)
    converted = {k for sources in recorded["converted"].values() for k in sources}
    assert converted | set(recorded["dropped"]) == stored
    assert not converted & set(recorded["dropped"])
    if shape.tied_embeddings:
        assert any(r.startswith("tied embeddings") for r in recorded["dropped"].values())
    # A digest of every file in the folder but the manifest itself.
    assert set(recorded["output"]["files"]) == {p.name for p in folder.iterdir()} - {
        FOLDER_MANIFEST
    }
    assert recorded["output"]["bytes"] == sum(
        (folder / name).stat().st_size for name in recorded["output"]["files"]
    )


def test_one_shard_is_model_safetensors_without_index(tmp_path, layout_checkpoints):
    root, shape, saved = layout_checkpoints[TORCHTITAN_0_3, "gqa_tied"]
    result = convert(tmp_path, root, shape, f"experiment.step={FULL_STEP}", "sha256=true")
    assert result.status == "converted", result.error
    folder = Path(result.output)
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", *DESCRIBING}
    expected = expected_hf(saved[FULL_STEP], shape, "bfloat16")
    save_file(expected, tmp_path / "ref.safetensors", {"format": "pt"})
    assert (folder / "model.safetensors").read_bytes() == (
        tmp_path / "ref.safetensors"
    ).read_bytes()
    recorded = manifest(folder)["output"]["files"]
    for name, digests in recorded.items():
        data = (folder / name).read_bytes()
        assert digests["bytes"] == len(data)
        assert digests["sha256"] == hashlib.sha256(data).hexdigest(), name


def _plan_of(sizes: list[int]) -> tuple[Plan, dict[str, torch.Tensor]]:
    """A plan of float32 tensors of these byte sizes, and a state dict of them in that order."""
    tensors = [OutputTensor(f"t{i}", (n // 4,), torch.float32, ()) for i, n in enumerate(sizes)]
    plan = Plan("llama3", "#2937", True, tensors, [])
    return plan, {t.name: torch.zeros(t.shape) for t in tensors}


@pytest.mark.parametrize(
    "sizes, limit",
    [
        ([400, 400, 200, 400], "1000"),  # an exact fit stays in its shard
        ([400, 2400, 400, 400, 4000, 8], "1KB"),  # oversized tensors, each alone
        ([400] * 5, "5GB"),  # one shard
        ([4000, 400], "1000"),
    ],
)
def test_split_is_huggingface_hubs(sizes, limit):
    """The same files, holding the same tensors, as huggingface_hub's own split (which
    transformers' save_pretrained uses), given the tensors in the same order."""
    from huggingface_hub import split_torch_state_dict_into_shards

    plan, state_dict = _plan_of(sizes)
    ours = FORMATS["hf"].files(plan, HfOptions(max_shard_size=limit))
    theirs = split_torch_state_dict_into_shards(state_dict, max_shard_size=shard_bytes(limit))
    assert {f: sorted(t.name for t in ts) for f, ts in ours.items()} == {
        f: sorted(ts) for f, ts in theirs.filename_to_tensors.items()
    }


@pytest.mark.parametrize(
    "value, expected",
    [
        ("5GB", 5 * 10**9),
        ("200kb", 200_000),
        ("1000", 1000),
        ("1.5MB", 1_500_000),
        ("4GiB", 4 << 30),
    ],
)
def test_max_shard_size_units(value, expected):
    assert shard_bytes(value) == expected


@pytest.mark.parametrize("value", ["0", "5 GB per file", "-1KB", "GB", ""])
def test_a_bad_max_shard_size_fails_before_any_work(value):
    from converter.config import to_object

    with pytest.raises(ValueError, match="is not a size"):
        to_object(
            compose(
                ["experiment=debug", "output_format=hf", f"output_format.max_shard_size='{value}'"]
            )
        )


def test_default_output_and_a_file_name_refused():
    from converter.config import to_object

    conf = to_object(compose(["experiment=debug", "output_format=hf"]))
    assert conf.experiment.output == f"{conf.experiment.checkpoint_dir}/final_model_hf"
    with pytest.raises(ValueError, match="must be a folder for output_format=hf"):
        to_object(compose(["experiment=debug", "output_format=hf", "experiment.output=/x/m.pt"]))


def test_config_json_loads_in_transformers_as_the_model(tmp_path, layout_checkpoints):
    """Every architecture field, both RoPE spellings with all six keys, the dtype under both
    names, and no RoPE scaling when the run had none."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    for scaling in ("true", "false"):
        out = tmp_path / scaling
        result = convert(
            out,
            root,
            shape,
            f"experiment.step={FULL_STEP}",
            f"experiment.model.rope_scaling={scaling}",
        )
        assert result.status == "converted", result.error
        written = json.loads((Path(result.output) / "config.json").read_text())
        assert written["dtype"] == written["torch_dtype"] == "bfloat16"
        assert written["rope_theta"] == 500000.0 and isinstance(written["rms_norm_eps"], float)
        config = AutoConfig.from_pretrained(result.output)
        assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (
            shape.dim,
            shape.hidden_dim,
            shape.n_layers,
        )
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
            shape.n_heads,
            shape.n_kv_heads,
            shape.head_dim,
        )
        assert config.vocab_size == shape.vocab_size and config.dtype == torch.bfloat16
        assert config.max_position_embeddings == 131072 and not config.tie_word_embeddings
        inv_freq = LlamaRotaryEmbedding(config).inv_freq
        plain = 1.0 / 500000.0 ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim)
        if scaling == "true":
            assert config.rope_parameters == {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
            assert written["rope_scaling"] == {
                k: v for k, v in config.rope_parameters.items() if k != "rope_theta"
            }
            assert not torch.allclose(inv_freq, plain)  # the low frequencies are scaled
        else:
            assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
            assert written["rope_scaling"] is None
            torch.testing.assert_close(inv_freq, plain)


@pytest.mark.parametrize(
    ("kept", "said"),
    [
        ({"bfloat16"}, "bfloat16"),
        ({"bfloat16", "float32"}, "float32"),
        ({"bfloat16", "float16"}, "float32"),
        ({"float64", "bfloat16"}, "float64"),
    ],
)
def test_config_json_dtype_holds_every_weight(kept, said):
    """from_pretrained loads every weight in config.json's dtype: weights kept in several
    (export_dtype=keep) get the one that holds each of them exactly."""
    from converter.models.base import build_plan
    from converter.models.llama3 import Llama3, Llama3Config

    shape = demo.ModelShape(**VARIANTS["mha"])
    dtypes = [getattr(torch, d) for d in sorted(kept)]
    tensors = {
        k: (s, dtypes[-1] if "norm" in k else dtypes[0])
        for k, (s, _) in demo.model_state_shapes(shape, TORCHTITAN_0_3).items()
    }
    plan, arch = build_plan(
        Llama3(), Llama3Config(n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads), tensors,
        [], "hf", False, None, lambda k: torch.zeros(tensors[k][0]), "step-1",
    )  # fmt: skip
    fmt = FORMATS["hf"]
    described = Described(Path("out"), "x", Llama3(), arch, plan, HfOptions(), None, {})
    config = fmt.config(described, {})
    assert config["dtype"] == config["torch_dtype"] == said


def test_tokenizer_files_are_copied_and_give_the_token_ids(tmp_path, layout_checkpoints):
    from transformers import AutoTokenizer, GenerationConfig

    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    assets = tmp_path / "assets"
    ids = make_tokenizer(assets, shape.vocab_size)
    (assets / "README.md").write_text("not copied\n")
    (assets / "original").mkdir()
    (assets / "original" / "tokenizer.model").write_bytes(b"tiktoken ranks\n")
    run = convert(
        tmp_path, root, shape, f"experiment.step={FULL_STEP}", f"experiment.tokenizer_dir={assets}"
    )
    assert run.status == "converted", run.error
    folder = Path(run.output)
    for name in ("tokenizer.json", "tokenizer_config.json", "original/tokenizer.model"):
        assert (folder / name).read_bytes() == (assets / name).read_bytes(), name
    assert not (folder / "README.md").exists()
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in ids} == ids
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.bos_token_id, generation.eos_token_id) == (
        ids["bos_token_id"],
        ids["eos_token_id"],
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token_id == ids["eos_token_id"] and tokenizer("w3 w7").input_ids == [3, 7]
    recorded = manifest(folder)
    assert recorded["output"]["missing"] == []
    assert "original/tokenizer.model" in recorded["output"]["files"]

    # The same run again is up to date; a changed tokenizer file is another conversion.
    again = convert(
        tmp_path, root, shape, f"experiment.step={FULL_STEP}", f"experiment.tokenizer_dir={assets}"
    )
    assert again.status == "skipped", again.error
    (assets / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    changed = convert(
        tmp_path, root, shape, f"experiment.step={FULL_STEP}", f"experiment.tokenizer_dir={assets}"
    )
    assert changed.status == "failed" and "(generation_config.json; experiment.tokenizer_dir)" in (
        changed.error
    )
    replaced = convert(
        tmp_path,
        root,
        shape,
        f"experiment.step={FULL_STEP}",
        f"experiment.tokenizer_dir={assets}",
        "overwrite=true",
    )
    assert replaced.status == "converted", replaced.error
    # The assets' own generation_config.json is copied as it is, and gives eos.
    assert (folder / "generation_config.json").read_text() == json.dumps({"eos_token_id": [5, 6]})
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == [5, 6]


def test_without_tokenizer_the_manifest_says_what_to_copy(tmp_path, layout_checkpoints):
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    run = convert(tmp_path, root, shape, f"experiment.step={FULL_STEP}")
    assert run.status == "converted", run.error
    [missing] = manifest(Path(run.output))["output"]["missing"]
    assert "experiment.tokenizer_dir is not set" in missing and "tokenizer.json" in missing
    assert run.warnings and "no tokenizer files" in run.warnings[-1]
    config = json.loads((Path(run.output) / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None


def test_a_tokenizer_that_names_no_special_token_is_said(tmp_path, layout_checkpoints):
    """tokenizer.json alone gives no eos token: config.json and generation_config.json get
    null, and the manifest and the log say so (generation would not stop at an eos). No bos
    is a tokenizer's choice, and not said."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    assets = tmp_path / "assets"
    make_tokenizer(assets, shape.vocab_size)
    for name in os.listdir(assets):
        if name != "tokenizer.json":
            (assets / name).unlink()
    run = convert(
        tmp_path, root, shape, f"experiment.step={FULL_STEP}", f"experiment.tokenizer_dir={assets}"
    )
    assert run.status == "converted", run.error
    [missing] = manifest(Path(run.output))["output"]["missing"]
    assert missing.startswith("eos_token_id null in ") and str(assets) in missing
    assert run.warnings and run.warnings[-1].endswith(missing)
    config = json.loads((Path(run.output) / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    (assets / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    eos_only = convert(
        tmp_path, root, shape, f"experiment.step={FULL_STEP}", f"experiment.tokenizer_dir={assets}",
        "overwrite=true",
    )  # fmt: skip
    assert eos_only.status == "converted", eos_only.error
    assert manifest(Path(eos_only.output))["output"]["missing"] == []


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d.mkdir(), (d / "notes.txt").write_text("x")), "holds no tokenizer files"),
        (lambda d: make_tokenizer(d, 4096), "token ids up to 4093"),
        (
            lambda d: (d.mkdir(), (d / "tokenizer.json").write_text("{not json")),
            "tokenizer.json (",
        ),
    ],
    ids=["missing", "no_tokenizer", "another_vocabulary", "not_json"],
)
def test_a_wrong_tokenizer_dir_fails_before_any_work(
    tmp_path, layout_checkpoints, prepare, message
):
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    assets = tmp_path / "assets"
    prepare(assets)
    run = convert(
        tmp_path, root, shape, f"experiment.step={FULL_STEP}", f"experiment.tokenizer_dir={assets}"
    )
    assert run.status == "failed" and message in run.error, run.error
    assert str(assets) in run.error
    assert not (tmp_path / "out").exists()


def test_a_folder_on_disk_is_skipped_replaced_or_refused(tmp_path, layout_checkpoints):
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    step = f"experiment.step={FULL_STEP}"
    folder = tmp_path / "out" / "model_hf"
    folder.mkdir(parents=True)  # an empty folder holds nothing to lose: taken as it is
    small = convert(tmp_path, root, shape, step, f"output_format.max_shard_size={SMALL_SHARDS}")
    assert small.status == "converted", small.error
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert len(shards(folder)) > 1

    assert (
        convert(tmp_path, root, shape, step, f"output_format.max_shard_size={SMALL_SHARDS}").status
        == "skipped"
    )
    refused = convert(tmp_path, root, shape, step)  # another max_shard_size
    assert refused.status == "failed" and "its output_format.max_shard_size was" in refused.error
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    # A file added to the folder: torchtitan's HF reader would load any *.safetensors there.
    (folder / "extra.safetensors").write_bytes(b"x")
    stray = convert(tmp_path, root, shape, step, f"output_format.max_shard_size={SMALL_SHARDS}")
    assert stray.status == "failed" and "no longer match its manifest" in stray.error
    assert "(extra.safetensors was added)" in stray.error

    replaced = convert(tmp_path, root, shape, step, "overwrite=true")
    assert replaced.status == "converted", replaced.error
    # One shard now: none of the old shards, nor the stray file, is left; nothing beside.
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", *DESCRIBING}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model_hf"]
    forced = convert(tmp_path, root, shape, step, "force=true")
    assert forced.status == "converted"
    assert convert(tmp_path, root, shape, step).status == "skipped"


def test_a_folder_not_ours_is_replaced_only_with_overwrite(tmp_path, layout_checkpoints):
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    folder = tmp_path / "out" / "model_hf"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"someone else's")
    refused = convert(tmp_path, root, shape, f"experiment.step={FULL_STEP}")
    assert refused.status == "failed" and "no manifest of ours" in refused.error
    assert [p.name for p in folder.iterdir()] == ["model.safetensors"]
    done = convert(tmp_path, root, shape, f"experiment.step={FULL_STEP}", "overwrite=true")
    assert done.status == "converted", done.error
    assert (folder / FOLDER_MANIFEST).is_file()


@pytest.mark.parametrize("where", ["checkpoint_dir", "tokenizer_dir", "file"])
def test_an_output_folder_that_holds_an_input_or_is_a_file_is_refused(
    tmp_path, layout_checkpoints, where
):
    """With overwrite=true too: replacing the folder would delete the checkpoint or the
    tokenizer; a file is never replaced by a folder."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    assets = tmp_path / "assets"
    make_tokenizer(assets, shape.vocab_size)
    output = {"checkpoint_dir": root, "tokenizer_dir": assets, "file": tmp_path / "model_hf"}[where]
    if where == "file":
        output.write_text("a file\n")
    cfg = compose(
        [
            "experiment=debug",
            f"experiment.checkpoint_dir={root}",
            f"experiment.step={FULL_STEP}",
            f"experiment.output={output}",
            f"experiment.tokenizer_dir={assets}",
            "output_format=hf",
            "overwrite=true",
            *model_overrides(shape),
        ]
    )
    run = job.run(cfg)
    message = {
        "checkpoint_dir": "holds the source step folder",
        "tokenizer_dir": "holds experiment.tokenizer_dir",
        "file": "is a file; output_format=hf writes a folder",
    }[where]
    assert run.status == "failed" and message in run.error, run.error
    assert not list(tmp_path.rglob(".*.partial")) and not list(tmp_path.rglob(".*.lock"))
    assert (root / f"step-{FULL_STEP}" / ".metadata").is_file()


def test_parameters_and_tensors_in_the_manifest(tmp_path, layout_checkpoints):
    root, shape, saved = layout_checkpoints[TORCHTITAN_0_3, "gqa_tied"]
    run = convert(tmp_path, root, shape, f"experiment.step={FULL_STEP}")
    expected = expected_hf(saved[FULL_STEP], shape, "bfloat16")
    output = manifest(Path(run.output))["output"]
    assert output["tensors"] == len(expected)
    assert output["parameters"] == sum(math.prod(t.shape) for t in expected.values())
    assert output["format"] == "hf" and "AutoModelForCausalLM" in output["loads_with"]
