"""What happens to an output already on disk, and that the read-back check catches bad bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import xxhash

from converter import job
from converter.digests import file_digest
from converter.engine import convert_tensors
from converter.errors import ConversionError
from converter.formats import FORMATS
from converter.formats.hf import HfOptions
from converter.manifest import package_versions
from converter.models.base import build_plan
from converter.models.llama3 import Llama3, Llama3Config
from converter.publish import Output
from converter.sources.dcp import DcpIndex
from converter.sources.reader import TensorReader
from converter.sources.storage import LocalStorage
from converter.verify import ReadBehind, Staged, read_back
from tests.conftest import (
    FULL_STEP,
    WEIGHTS_ONLY_STEP,
    compose,
    make_tokenizer,
    model_overrides,
)

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow

TORCHTITAN_0_3 = "#2937"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(root, shape, out: Path, *overrides: str) -> job.JobResult:
    return job.run(
        compose(
            [
                "experiment=debug",
                f"experiment.checkpoint_dir={root}",
                f"experiment.step={FULL_STEP}",
                f"experiment.output={out}",
                *model_overrides(shape),
                *overrides,
            ]
        )
    )


def test_existing_output_is_replaced_only_with_overwrite(layout_checkpoints, tmp_path):
    root, shape, saved = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    out = tmp_path / "model.pt"
    assert _run(root, shape, out, "experiment.export_dtype=bfloat16").status == "converted"
    before = _sha(out)

    refused = _run(root, shape, out, "experiment.export_dtype=float32")
    assert (
        refused.status == "failed" and "already exists, but its export_dtype was" in refused.error
    )
    assert "bfloat16, this run's is float32" in refused.error, refused.error
    assert "overwrite=true" in refused.error and _sha(out) == before
    # force=true converts an up-to-date output again; it replaces nothing made differently.
    forced_other = _run(root, shape, out, "experiment.export_dtype=float32", "force=true")
    assert forced_other.status == "failed" and "its export_dtype was" in forced_other.error
    assert _sha(out) == before
    other_step = _run(root, shape, out, f"experiment.step={WEIGHTS_ONLY_STEP}")
    assert f"it was converted from {root.resolve() / f'step-{FULL_STEP}'}" in other_step.error

    assert _run(root, shape, out, "experiment.export_dtype=bfloat16").status == "skipped"
    # The same checkpoint reached through a symbolic link is the same source.
    (tmp_path / "link").symlink_to(root)
    linked = _run(tmp_path / "link", shape, out, "experiment.export_dtype=bfloat16")
    assert linked.status == "skipped", linked.error
    forced = _run(root, shape, out, "experiment.export_dtype=bfloat16", "force=true")
    assert forced.status == "converted" and _sha(out) == before

    replaced = _run(root, shape, out, "experiment.export_dtype=float32", "overwrite=true")
    assert replaced.status == "converted"
    loaded = torch.load(out, mmap=True, weights_only=True)
    assert torch.equal(loaded["norm.weight"], saved[FULL_STEP]["norm.weight"].float())


def test_an_output_not_given_what_this_run_asks_is_converted_again(layout_checkpoints, tmp_path):
    """An output written with verify=false was never read back, and one without sha256 has
    none to give: a run that asks for either converts it again (the same bytes), and only then
    is it up to date."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    out = tmp_path / "model.pt"
    manifest = tmp_path / "model.pt.manifest.json"
    assert _run(root, shape, out, "verify=false").status == "converted"
    before = _sha(out)
    verified = _run(root, shape, out)
    assert verified.status == "converted" and _sha(out) == before
    assert json.loads(manifest.read_text())["config"]["verify"] is True
    assert _run(root, shape, out).status == "skipped"
    hashed = _run(root, shape, out, "sha256=true")
    assert hashed.status == "converted"
    written = json.loads(manifest.read_text())["output"]
    assert written["files"][""]["sha256"] == before
    assert "sha256" in written["sidecars"]["model.pt.torchtune.yaml"]
    assert _run(root, shape, out, "sha256=true").status == "skipped"
    assert _run(root, shape, out).status == "skipped"  # sha256 recorded and not asked: kept


def _package_digest() -> str:
    """The XXH3-128 of the converter package's .py files, as the fingerprint should take it."""
    package = Path(__file__).resolve().parents[1] / "converter"
    digest = xxhash.xxh3_128()
    for path in sorted(package.rglob("*.py")):
        digest.update(f"{path.relative_to(package).as_posix()}\0".encode())
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.mark.parametrize("written_by", ["other code", "a version recording no code"])
def test_an_output_of_another_converter_is_converted_again(
    layout_checkpoints, tmp_path, caplog, written_by
):
    """An output written from the same source and settings by another converter's code (one
    from before a fix, say: the version alone did not change) may hold what the fix changed:
    converted again, with no setting, and then up to date. An output that differs otherwise
    is refused, naming the converter too."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    out = tmp_path / "model.pt"
    manifest = tmp_path / "model.pt.manifest.json"
    assert _run(root, shape, out).status == "converted"
    recorded = json.loads(manifest.read_text())
    assert recorded["fingerprint"]["converter_code_xxh3_128"] == _package_digest()
    if written_by == "other code":
        recorded["fingerprint"]["converter_code_xxh3_128"] = "0" * 32
    else:
        del recorded["fingerprint"]["converter_code_xxh3_128"]
    manifest.write_text(json.dumps(recorded))
    refused = _run(root, shape, out, "experiment.export_dtype=float32")
    assert refused.status == "failed", refused.error
    code = "code 000000000000" if written_by == "other code" else "code not recorded"
    said = f"it was written by another titan2tune (version {package_versions()['titan2tune']}, "
    assert f"{said}{code})" in refused.error
    with caplog.at_level("INFO", logger="titan2tune"):
        assert _run(root, shape, out).status == "converted"
    assert f"{said}{code})" in caplog.text
    assert _run(root, shape, out).status == "skipped"


@pytest.mark.parametrize("damage", ["removed", "edited"])
def test_a_recipe_snippet_beside_a_pt_that_is_not_ours_is_not_up_to_date(
    layout_checkpoints, tmp_path, damage
):
    """The recipe snippet is the output's as much as the .pt is: lost or edited, the output
    is not this conversion's, and is replaced only with overwrite=true (which writes it
    again)."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    out = tmp_path / "model.pt"
    snippet = tmp_path / "model.pt.torchtune.yaml"
    assert _run(root, shape, out).status == "converted"
    written = snippet.read_text()
    if damage == "removed":
        snippet.unlink()
    else:
        snippet.write_text("garbage\n")
    refused = _run(root, shape, out)
    assert refused.status == "failed" and "no longer match its manifest" in refused.error
    assert _run(root, shape, out, "overwrite=true").status == "converted"
    assert snippet.read_text() == written


@pytest.mark.parametrize("fmt_name", ["meta", "hf"])
def test_an_output_moved_or_copied_elsewhere_is_not_up_to_date_there(
    layout_checkpoints, tmp_path, fmt_name
):
    """The recipe snippet names the output's own folder: moved, or copied, the output would
    send torchtune to the old place, so it is converted again only with overwrite=true, where
    the snippet names the new place; where it was written, it is still up to date."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    name = "model.pt" if fmt_name == "meta" else "model_hf"
    first, moved = tmp_path / "a" / name, tmp_path / "b" / name
    fmt = f"output_format={fmt_name}"
    assert _run(root, shape, first, fmt).status == "converted"
    shutil.copytree(first.parent, moved.parent, copy_function=shutil.copy2)
    refused = _run(root, shape, moved, fmt)
    assert refused.status == "failed", refused.error
    assert f"it was written at {first.resolve()} and moved or copied here" in refused.error
    assert _run(root, shape, first, fmt).status == "skipped"
    assert _run(root, shape, moved, fmt, "overwrite=true").status == "converted"
    snippet = (
        moved / "titan2tune.torchtune.yaml"
        if fmt_name == "hf"
        else moved.parent / (name + ".torchtune.yaml")
    )
    assert f"checkpoint_dir: {moved.parent if fmt_name == 'meta' else moved}" in snippet.read_text()


def test_a_changed_token_id_in_the_tokenizers_config_is_not_up_to_date(
    layout_checkpoints, tmp_path
):
    """config.json of experiment.tokenizer_dir is read for the special token ids but not
    copied: edited, the output's config.json would keep the old ids."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    assets = tmp_path / "assets"
    ids = make_tokenizer(assets, shape.vocab_size)
    (assets / "config.json").write_text(json.dumps({"eos_token_id": ids["bos_token_id"]}))
    out = tmp_path / "model_hf"
    args = ("output_format=hf", f"experiment.tokenizer_dir={assets}")
    assert _run(root, shape, out, *args).status == "converted"
    assert _run(root, shape, out, *args).status == "skipped"
    # A manifest written before that file was recorded is up to date as that version said.
    manifest = out / "titan2tune.manifest.json"
    written = manifest.read_text()
    recorded = json.loads(written)
    del recorded["fingerprint"]["assets"]["config.json (read, not copied)"]
    manifest.write_text(json.dumps(recorded))
    assert _run(root, shape, out, *args).status == "skipped"
    manifest.write_text(written)
    (assets / "config.json").write_text(json.dumps({"eos_token_id": ids["pad_token_id"]}))
    refused = _run(root, shape, out, *args)
    assert refused.status == "failed"
    assert "it took from the tokenizer folder differ now (config.json (read, not copied);" in (
        refused.error
    )
    assert _run(root, shape, out, *args, "overwrite=true").status == "converted"
    written = json.loads((out / "config.json").read_text())
    assert written["eos_token_id"] == ids["pad_token_id"]


@pytest.mark.parametrize("edited", ["[]", '{"fingerprint": "x"}', '{"fingerprint": {}}'])
def test_a_manifest_edited_into_another_shape_is_not_ours(layout_checkpoints, tmp_path, edited):
    """Valid JSON, but not a manifest: the output is refused as one not known to be ours,
    and overwrite=true replaces it (a crash before, on every run, overwrite=true too)."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    out = tmp_path / "model.pt"
    assert _run(root, shape, out).status == "converted"
    (tmp_path / "model.pt.manifest.json").write_text(edited)
    refused = _run(root, shape, out)
    assert refused.status == "failed" and "no manifest of ours" in refused.error, refused.error
    assert _run(root, shape, out, "overwrite=true").status == "converted"
    assert _run(root, shape, out).status == "skipped"


@pytest.mark.parametrize("cached", ["[]", '{"mb_per_s": "fast"}', '{"mb_per_s": 0}'])
def test_a_damaged_rate_cache_leaves_the_estimate_out(
    layout_checkpoints, tmp_path, monkeypatch, capsys, cached
):
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "titan2tune").mkdir(parents=True)
    (tmp_path / "cache" / "titan2tune" / "last_rate.json").write_text(cached)
    planned = _run(root, shape, tmp_path / "model.pt", "dry_run=true")
    assert planned.status == "planned", planned.error
    assert "no conversion measured on this machine yet" in capsys.readouterr().out


def test_a_torchtune_output_dir_that_cannot_be_made_is_said(layout_checkpoints, tmp_path):
    """The recipe snippet sends torchtune's saves to a sibling of the output's folder; where
    that cannot be created, the manifest and the log say to set it."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    out = tmp_path / "run" / "model.pt"
    (tmp_path / "run_torchtune").write_text("a file where the folder would go\n")
    result = _run(root, shape, out)
    assert result.status == "converted", result.error
    [missing] = json.loads((tmp_path / "run" / "model.pt.manifest.json").read_text())["output"][
        "missing"
    ]
    assert missing.startswith(f"torchtune cannot create {tmp_path / 'run_torchtune' / 'model'}")
    assert result.warnings[-1].endswith(missing)


def test_a_file_not_ours_at_the_output_is_replaced_as_the_error_advises(
    layout_checkpoints, tmp_path
):
    """The one error that advises overwrite=true: following it converts, and nothing else is
    touched."""
    root, shape, saved = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    out = tmp_path / "model.pt"
    out.write_bytes(b"someone else's weights")
    refused = _run(root, shape, out)
    assert refused.status == "failed" and "no manifest of ours" in refused.error
    assert "Set overwrite=true to replace it" in refused.error
    assert out.read_bytes() == b"someone else's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]

    forced = _run(root, shape, out, "force=true")
    assert forced.status == "failed" and "no manifest of ours" in forced.error
    assert out.read_bytes() == b"someone else's weights"

    assert _run(root, shape, out, "overwrite=true").status == "converted"
    loaded = torch.load(out, mmap=True, weights_only=True)
    assert torch.equal(loaded["norm.weight"], saved[FULL_STEP]["norm.weight"].bfloat16())
    assert _run(root, shape, out).status == "skipped"


def test_a_folder_that_holds_a_checkpoint_is_never_replaced(layout_checkpoints, tmp_path):
    """An hf output named after another step folder of the checkpoint (or any DCP save) is
    refused with overwrite=true too: replacing it would delete that checkpoint."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    other_step = root / f"step-{WEIGHTS_ONLY_STEP}"
    before = {p.name: _sha(p) for p in other_step.iterdir()}
    for flags in ((), ("overwrite=true",), ("overwrite=true", "force=true")):
        refused = _run(root, shape, other_step, "output_format=hf", *flags)
        assert refused.status == "failed", flags
        assert f"experiment.output {other_step} holds a DCP checkpoint (.metadata, " in (
            refused.error
        )
        assert "never does, with overwrite=true or without" in refused.error
        assert {p.name: _sha(p) for p in other_step.iterdir()} == before
    # Nor a folder that holds one further down: another run's checkpoint folder, say.
    runs = tmp_path / "runs"
    shutil.copytree(other_step, runs / "other_run" / "step-7")
    refused = _run(root, shape, runs, "output_format=hf", "overwrite=true")
    assert refused.status == "failed"
    assert "holds a DCP checkpoint (other_run/step-7/.metadata, " in refused.error, refused.error
    assert sorted(p.name for p in (runs / "other_run" / "step-7").iterdir()) == sorted(before)


@contextmanager
def converted(
    layout_checkpoints, tmp_path: Path, workers: int, budget_bytes: int, fmt_name: str, lag=1 << 30
):
    """torchtitan 0.3.0's full save converted in-process into synced partial files (one .pt,
    or the shards of a Hugging Face folder), read back behind the writes (``lag``: see
    ReadBehind), before publishing: yields (the staged files, plan, reader, read-back, regions
    written)."""
    root, shape, _ = layout_checkpoints[TORCHTITAN_0_3, "mha"]
    index = DcpIndex(LocalStorage(str(root)), str(root / f"step-{FULL_STEP}"))
    reader = TensorReader(index)
    model = Llama3Config(n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads)
    fmt = FORMATS[fmt_name]
    plan, _ = build_plan(
        Llama3(),
        model,
        {k: (e.shape, e.dtype) for k, e in index.tensors.items()},
        index.byte_entries,
        fmt.naming,
        fmt.keeps_tied_head,
        torch.bfloat16,
        lambda key: reader.read_tensor(index.tensors[key]),
        "source",
    )
    options = HfOptions(max_shard_size="40KB") if fmt.folder else fmt.options()
    with Output(tmp_path / ("model_hf" if fmt.folder else "model.pt"), fmt.folder) as out:
        staged = []
        for name, tensors in fmt.files(plan, options).items():
            path = out.staging(name)
            staged.append(Staged(name, path, tensors, fmt.create(path, tensors)))
        behind = ReadBehind(staged, True, True, whole=[n for _, n in plan.tied], lag=lag)
        filler = out.filler(
            {n: (f.name, o) for f in staged for n, o in f.offsets.items()}, follower=behind
        )
        filled = convert_tensors(
            reader,
            plan,
            filler,
            workers=workers,
            budget_bytes=budget_bytes,
            allow_nonfinite=False,
            progress=lambda n: None,
        )
        filler.sync()
        yield staged, plan, reader, behind, filled.regions


def _read_back(fmt_name, staged, plan, reader, behind, regions):
    return read_back(FORMATS[fmt_name], staged, plan, reader, behind, regions)


@pytest.mark.parametrize("lag", [0, 1 << 30], ids=["following", "after_the_writes"])
@pytest.mark.parametrize("fmt_name", ["meta", "hf"])
def test_verify_gives_the_digests_and_rejects_a_changed_byte(
    layout_checkpoints, tmp_path, monkeypatch, fmt_name, lag
):
    """Intact, the read-back gives each file's digests, as a pass over the finished file
    would, whether it follows the writes (any output larger than its lag) or reads once they
    end. A byte that reaches the file other than it was given (a storage fault, made here by
    the write call) fails it, naming the tensor. Following, it drops the pages it read every
    4 KiB."""
    monkeypatch.setattr("converter.verify._DROP_BYTES", 1 << 12)
    dropped = []
    fadvise = os.posix_fadvise

    def counted_fadvise(fd, offset, length, advice):
        dropped.append(length)
        return fadvise(fd, offset, length, advice)

    monkeypatch.setattr("converter.verify.os.posix_fadvise", counted_fadvise)
    with converted(layout_checkpoints, tmp_path / "intact", 2, 1 << 20, fmt_name, lag) as (
        staged,
        plan,
        reader,
        behind,
        regions,
    ):
        assert len(staged) == (1 if fmt_name == "meta" else 7)
        digests = _read_back(fmt_name, staged, plan, reader, behind, regions)
        for file in staged:
            assert digests[file.name]["sha256"] == _sha(file.path)
            assert digests[file.name]["xxh3_128"] == file_digest(file.path)
    # Following, the pass drops what it read as it goes; otherwise it drops nothing.
    assert bool(dropped) == (lag == 0)
    victim = plan.tensors[3].name
    [at] = [f.offsets[victim] + 5 for f in staged if victim in f.offsets]
    pwrite = os.pwrite

    def faulty_pwrite(fd, data, pos):
        if pos <= at < pos + len(data):
            data = bytearray(data)
            data[at - pos] ^= 0x01
        return pwrite(fd, data, pos)

    monkeypatch.setattr("converter.filler.os.pwrite", faulty_pwrite)
    faulty = converted(layout_checkpoints, tmp_path / "faulty", 2, 1 << 20, fmt_name, lag)
    changed = pytest.raises(ConversionError, match=f"Verification of .* failed: .*{victim}")
    # Following, the pass fails the conversion at its next write; otherwise, at the end.
    with changed, faulty as (staged, plan, reader, behind, regions):
        _read_back(fmt_name, staged, plan, reader, behind, regions)


@pytest.mark.parametrize("lag", [0, 1 << 30], ids=["following", "after_the_writes"])
@pytest.mark.parametrize("check", [True, False], ids=["verify", "no_verify"])
def test_read_back_fails_on_a_region_never_written(layout_checkpoints, tmp_path, check, lag):
    """A region the engine never wrote stops the pass where it should have been: the digests
    of a file with a hole are never given, even with verify=false."""
    with converted(layout_checkpoints, tmp_path, 2, 1 << 12, "meta") as (
        staged,
        plan,
        reader,
        _,
        regions,
    ):
        victim = plan.tensors[2].name
        behind = ReadBehind(staged, check=check, sha256=False, lag=lag)
        for name, written in regions.items():
            for region in written if name != victim else sorted(written, key=lambda r: r.start)[1:]:
                behind.wrote(name, region)
        with pytest.raises(ConversionError, match=f"'{victim}' was not written exactly once"):
            behind.finish()


def _drop_a_region(plan, regions):
    name = plan.tensors[2].name
    return plan, {**regions, name: sorted(regions[name], key=lambda r: r.start)[:-1]}


def _rename_a_tensor(plan, regions):
    first = plan.tensors[0]
    renamed = dataclasses.replace(first, name=first.name + ".renamed")
    regions = {**regions, renamed.name: regions[first.name]}
    return dataclasses.replace(plan, tensors=[renamed, *plan.tensors[1:]]), regions


def _reshape_a_tensor(plan, regions):
    first = plan.tensors[0]
    reshaped = dataclasses.replace(first, shape=(first.shape[0] // 2, first.shape[1] * 2))
    return dataclasses.replace(plan, tensors=[reshaped, *plan.tensors[1:]]), regions


@pytest.mark.parametrize("fmt_name", ["meta", "hf"])
@pytest.mark.parametrize(
    "tamper, match",
    [
        (_drop_a_region, "was not written exactly once in full"),
        (_rename_a_tensor, "its keys differ from the planned ones"),
        (_reshape_a_tensor, r"is torch.bfloat16\(\d+, \d+\), expected torch.bfloat16"),
    ],
    ids=["missing_region", "wrong_key", "wrong_shape"],
)
def test_verify_rejects_a_file_that_is_not_the_plan(
    layout_checkpoints, tmp_path, tamper, match, fmt_name
):
    """Each check of the read-back on intact files whose plan or record of writes disagrees
    with them: a region never written, a tensor under another name, another shape."""
    # Small windows: every tensor is written as several regions.
    with converted(layout_checkpoints, tmp_path, 1, 1 << 12, fmt_name) as (
        staged,
        plan,
        reader,
        behind,
        regions,
    ):
        assert _read_back(fmt_name, staged, plan, reader, behind, regions)
        bad_plan, bad_regions = tamper(plan, regions)
        changed = dict(zip((t.name for t in plan.tensors), bad_plan.tensors, strict=True))
        bad = [dataclasses.replace(f, tensors=[changed[t.name] for t in f.tensors]) for f in staged]
        with pytest.raises(ConversionError, match=f"Verification of .* failed: .*{match}"):
            _read_back(fmt_name, bad, bad_plan, reader, behind, bad_regions)
