"""A user's mistakes, typed as a user types them: each ends in a clear error and a non-zero
exit, never in exit 0 with a wrong or missing result."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.conftest import REPO, TINY, model_overrides

if TYPE_CHECKING:
    from converter.job import JobResult

# Starts ranks, subprocesses or servers: not in the fast layer (pytest -m 'not slow').
pytestmark = pytest.mark.slow


def convert(checkpoint: Path, tmp_path: Path, *overrides: str) -> CompletedProcess:
    args = [
        "experiment=debug",
        f"experiment.checkpoint_dir={checkpoint}",
        f"experiment.output={tmp_path / 'out' / 'model.pt'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *model_overrides(TINY),
        *overrides,
    ]
    return convert_py(*args)


def convert_py(*args: str, cwd: Path = REPO, env: dict | None = None) -> CompletedProcess:
    """``python convert.py ARGS``, as a user types it."""
    return subprocess.run(
        [sys.executable, str(REPO / "convert.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("+experiment.stpe=10", "unknown key experiment.stpe (did you mean experiment.step?)"),
        ("+output_fromat=torchtune", "unknown key output_fromat (did you mean output_format?)"),
        ("+experiment.model.n_haeds=4", "did you mean experiment.model.n_heads?"),
        ("experiment.model.dim=512", "dim=512 (the weights say 32)"),
        ("experiment.model.vocab_size=4096", "vocab_size=4096 (the weights say 64)"),
        ("experiment.model.hidden_dim=1024", "hidden_dim=1024 (the weights say 96)"),
        (
            "experiment.model.n_kv_heads=2",
            "give n_kv_heads / n_heads = 32/32, not 2/4",
        ),
        ("hydra/launcher=slurm", "Hydra runs a launcher only in a multirun: add -m"),
    ],
)
def test_mistake_is_an_error(tiny_checkpoint, tmp_path, override, expected):
    run = convert(tiny_checkpoint, tmp_path, override)
    assert run.returncode == 1, run.stderr[-2000:]
    assert expected in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["experiment.output", "experiment.tokenizer_dir"])
def test_a_url_where_a_local_path_is_needed_is_an_error(tiny_checkpoint, tmp_path, key):
    """The checkpoint may lie in object storage; the output, and the tokenizer copied into it,
    stay local."""
    url = "s3://bucket/run7/model.pt" if key == "experiment.output" else "s3://bucket/run7"
    run = convert(tiny_checkpoint, tmp_path, f"{key}={url}")
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"{key}='{url}' is a URL" in run.stderr, run.stderr[-2000:]
    assert not (REPO / "s3:").exists() and not (tmp_path / "s3:").exists()


def test_a_remote_checkpoint_needs_a_local_output(tmp_path):
    """Left at its default, the output would lie beside a checkpoint in a bucket: refused
    before anything is read, saying where to set it."""
    run = convert_py(
        "experiment=debug",
        "experiment.checkpoint_dir=s3://bucket/run7",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert "experiment.output='s3://bucket/run7/final_model.pt' is a URL" in run.stderr
    assert "set it to a local path" in run.stderr, run.stderr[-2000:]
    assert not (REPO / "s3:").exists()


def test_the_same_run_without_a_mistake_converts(tiny_checkpoint, tmp_path):
    """The cases above fail for their mistake, not for the fixture. Head counts the weights
    cannot confirm are named in the log and in the manifest."""
    run = convert(tiny_checkpoint, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "model.pt").is_file()
    said = f"n_heads={TINY.n_heads} and n_kv_heads={TINY.n_kv_heads} are taken from the config"
    assert said in run.stderr, run.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "model.pt.manifest.json").read_text())
    assert any(said in line for line in manifest["assumptions"])


@pytest.mark.parametrize(
    "launcher, spelling",
    [("basic", "list"), ("slurm", "list"), ("basic", "glob"), ("basic", "file")],
)
def test_a_sweep_whose_jobs_share_an_output_is_refused_before_it_runs(
    tiny_checkpoint, tmp_path, launcher, spelling
):
    """Refused in the launching process, before any job starts (locally) or is submitted (on
    SLURM: hydra/launcher=slurm would write its sbatch scripts to the sweep's .submitit/),
    however the sweep is spelled: a list, a glob over the experiments, or the sweeper's
    params in a config file."""
    mine = tmp_path / "mine" / "sweep" / "both.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n"
        "      experiment: debug,debug_pretrained\n"
    )
    experiments = {
        "list": ["experiment=debug,debug_pretrained"],
        "glob": ["experiment=glob(debug*)"],
        "file": ["+sweep=both"],
    }[spelling]
    output = tmp_path / "out" / "same.pt"
    run = convert_py(
        *(["--config-dir", str(mine.parents[1])] if spelling == "file" else []),
        "-m",
        f"hydra/launcher={launcher}",
        *experiments,
        f"experiment.checkpoint_dir={tiny_checkpoint}",
        f"experiment.output={output}",
        "overwrite=true",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *model_overrides(TINY),
    )
    said = run.stdout + run.stderr  # Hydra logs to stdout in the launching process
    assert run.returncode == 1, said[-2000:]
    assert "Jobs of this sweep would write the same output" in said, said[-2000:]
    assert f"{output} by [experiment=debug " in said
    assert "[experiment=debug_pretrained " in said
    assert "Traceback" not in said and "a bug of titan2tune" not in said
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "sweep" / ".submitit").exists()  # where the slurm profile submits


@pytest.mark.parametrize(
    "case", ["hydra's values", "the job's folder", "nested", "apart by job number"]
)
def test_sweep_outputs_are_checked_as_each_job_resolves_them(tiny_checkpoint, tmp_path, case):
    """An output path that reads Hydra's values (``${hydra:...}``, the job's folder included)
    is resolved as the job will resolve it: two jobs that land on one path are refused (job 0's
    output was replaced by job 1's, exit 0, before), as are two outputs one inside the other;
    outputs apart by the job's number are not."""
    out = tmp_path / "out"
    sweep_dir = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    swept = {
        "hydra's values": [
            "experiment=debug",
            "experiment.export_dtype=float32,bfloat16",
            f"experiment.output={out}/${{hydra:runtime.choices.experiment}}.pt",
            sweep_dir,
        ],
        # Each job's folder named for a choice both jobs share: one folder, one output.
        "the job's folder": [
            "experiment=debug,debug_pretrained",
            f"hydra.sweep.dir={out}",
            "hydra.sweep.subdir=${hydra:runtime.choices.output_format}",
            "experiment.output=${hydra:runtime.output_dir}/m.pt",
        ],
        "nested": [
            "experiment=debug",
            "output_format=hf",
            f"experiment.output={out}/nest,{out}/nest/inner",
            sweep_dir,
        ],
        "apart by job number": [
            "experiment=debug",
            "experiment.export_dtype=float32,bfloat16",
            f"experiment.output={out}/m${{hydra:job.num}}.pt",
            sweep_dir,
        ],
    }[case]
    run = convert_py(
        "-m",
        *swept,
        f"experiment.checkpoint_dir={tiny_checkpoint}",
        "overwrite=true",
        *model_overrides(TINY),
    )
    said = run.stdout + run.stderr
    assert "cannot be resolved before the sweep" not in said, said[-2000:]
    if case == "apart by job number":
        assert run.returncode == 0, said[-2000:]
        assert (out / "m0.pt").is_file() and (out / "m1.pt").is_file()
        return
    assert run.returncode == 1, said[-2000:]
    if case == "nested":
        assert f"would write an output inside another's: {out}/nest/inner by [" in said, said
        assert f"inside {out}/nest by [" in said, said
        assert not out.exists()
    else:
        same = out / ("meta/m.pt" if case == "the job's folder" else "debug.pt")
        assert f"would write the same output, each replacing the last: {same} by [" in said
        assert not same.exists()
    assert "Traceback" not in said


def test_an_output_inside_a_folder_output_is_refused(tiny_checkpoint, tmp_path):
    """A run whose output lies inside an hf folder written before would leave that folder
    unlike its manifest, and be deleted when the folder is replaced: refused, naming it."""
    folder = tmp_path / "out" / "model_hf"
    written = convert(tiny_checkpoint, tmp_path, "output_format=hf", f"experiment.output={folder}")
    assert written.returncode == 0, written.stderr[-2000:]
    before = sorted(p.name for p in folder.iterdir())
    inner = folder / "step5" / "model.pt"
    run = convert(tiny_checkpoint, tmp_path, f"experiment.output={inner}")
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"experiment.output {inner} lies inside {folder}, an output folder" in run.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


def test_a_jobs_saved_config_runs_that_job_again(tiny_checkpoint, tmp_path):
    """Hydra saves each job's composed config in .hydra/config.yaml; given back as the primary
    config, it is the same conversion: up to date, and converted again with force=true."""
    first = convert(tiny_checkpoint, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = ["--config-dir", str(tmp_path / "hydra" / ".hydra"), "--config-name", "config"]
    again = convert_py(*saved, f"hydra.run.dir={tmp_path / 'again'}")
    assert again.returncode == 0, again.stderr[-2000:]
    # Hydra's own logging: the saved config does not choose ours, which logs to stderr.
    assert "is up to date with this source and settings; skipped" in again.stdout + again.stderr
    forced = convert_py(*saved, f"hydra.run.dir={tmp_path / 'forced'}", "force=true")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "wrote " in forced.stdout + forced.stderr


def test_a_dry_run_sweep_may_share_an_output(tiny_checkpoint, tmp_path):
    """A dry run writes nothing, so its jobs may name one output: each prints its plan."""
    run = convert_py(
        "-m",
        "experiment=debug",
        "experiment.step=5,latest",
        "dry_run=true",
        f"experiment.checkpoint_dir={tiny_checkpoint}",
        f"experiment.output={tmp_path / 'out' / 'same.pt'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *model_overrides(TINY),
    )
    said = run.stdout + run.stderr
    assert run.returncode == 0, said[-2000:]
    assert said.count("nothing was written (dry_run=true)") == 2
    assert not (tmp_path / "out").exists()


def test_a_home_relative_path_is_expanded(tiny_checkpoint, tmp_path):
    """As typed in a shell: 'experiment.checkpoint_dir="~/ckpt"' (Hydra's grammar needs the
    quotes around a value that starts with ~). Both paths are taken from the user's home."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "ckpt").symlink_to(tiny_checkpoint)
    run = convert_py(
        "experiment=debug",
        'experiment.checkpoint_dir="~/ckpt"',
        'experiment.output="~/converted/model.pt"',
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *model_overrides(TINY),
        env={**os.environ, "HOME": str(home)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (home / "converted" / "model.pt").is_file()
    assert not (REPO / "~").exists()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_experiments_and_every_setting(flag):
    run = convert_py(flag)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "experiment: 500M, debug, debug_pretrained" in run.stdout, run.stdout
    for line in (
        "experiment.checkpoint_dir (required): the folder holding the step-<N> folders",
        "experiment.step (default latest): a step number, or latest",
        "experiment.output (default ${.checkpoint_dir}/${output_format.output_name})",
        "output_format: hf, meta, torchtune",
        "output_format.max_shard_size (default 5GB): the largest safetensors file",
        "experiment.tokenizer_dir (default null): torchtitan's hf_assets_path",
        "experiment/model/llama3: 1B, 3B, 405B, 70B, 8B, debugmodel",
        "experiment.model.n_kv_heads (default null)",
        "verify (default true): read the output back",
    ):
        assert line in run.stdout, run.stdout
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.parametrize(
    "left_out, key",
    [("checkpoint_dir", "experiment.checkpoint_dir"), ("n_heads", "experiment.model.n_heads")],
)
def test_a_key_missing_from_a_users_own_experiment_is_one_line(tmp_path, left_out, key):
    """The user's own experiment, in a folder given with --config-dir, lacks a required key."""
    lines = (REPO / "conf" / "experiment" / "500M.yaml").read_text().splitlines()
    own = tmp_path / "mine" / "experiment" / "run7.yaml"
    own.parent.mkdir(parents=True)
    kept = [line for line in lines if not line.strip().startswith(f"{left_out}:")]
    own.write_text("\n".join(kept).replace("name: 500M", "name: run7") + "\n")
    run = convert_py(
        "--config-dir",
        str(tmp_path / "mine"),
        "experiment=run7",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"{key} is required, but {own} does not set it" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "own, choice",
    [("experiment/debug.yaml", "experiment=debug"),
     ("experiment/model/llama3/debugmodel.yaml", "experiment/model=llama3/debugmodel")],
)  # fmt: skip
def test_a_users_file_named_as_one_of_ours_is_refused(tmp_path, own, choice):
    """Hydra searches conf/ before a --config-dir folder: a user's experiment named as one of
    ours would be ignored, and the job would convert the checkpoint ours names."""
    group, option = choice.split("=")
    ours = REPO / "conf" / f"{group}/{option}.yaml"
    theirs = tmp_path / "mine" / own
    theirs.parent.mkdir(parents=True)
    theirs.write_text(ours.read_text())
    run = convert_py(
        "--config-dir", str(tmp_path / "mine"), "experiment=debug", choice,
        f"hydra.run.dir={tmp_path / 'hydra'}", "dry_run=true",
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"{choice} is defined by 2 files: {ours}, {theirs}. Hydra reads the first" in (
        run.stderr
    ), run.stderr[-2000:]
    # conf/ itself given again is one definition of each.
    run = convert_py(
        "--config-dir", str(REPO / "conf"), "experiment=debug", choice,
        f"hydra.run.dir={tmp_path / 'hydra'}", "dry_run=true",
    )  # fmt: skip
    assert "is defined by" not in run.stderr, run.stderr[-2000:]


def test_a_yaml_error_in_a_users_own_experiment_is_one_line(tmp_path):
    own = tmp_path / "mine" / "experiment" / "run8.yaml"
    own.parent.mkdir(parents=True)
    own.write_text("name: run8\nstep: 10\n  model:\n    dim: 3\n")  # indented by mistake
    run = convert_py("--config-dir", str(tmp_path / "mine"), "experiment=run8")
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.stderr.startswith(f"{own} is not valid YAML: mapping values are not allowed")
    assert "line 3, column 8" in run.stderr and len(run.stderr.splitlines()) == 1


def test_cfg_with_a_sweep_is_one_line():
    run = convert_py("-m", "experiment=debug,500M", "--cfg", "job")
    assert run.returncode == 2, run.stderr
    assert "--cfg shows one job's config, and -m runs a sweep: drop -m" in run.stderr
    assert "Traceback" not in run.stderr


def test_outputs_named_for_the_resolved_step(tiny_checkpoint, tmp_path):
    """A sweep over steps writes one file per step, and step=latest names the step it took."""
    root = tmp_path / "checkpoint"
    root.mkdir()
    (root / "step-5").symlink_to(tiny_checkpoint / "step-5")
    shutil.copytree(tiny_checkpoint / "step-5", root / "step-7")
    named = "experiment.output=${experiment.checkpoint_dir}/model_step${resolved_step:}.pt"

    def run(*args: str, multirun: bool = False) -> CompletedProcess:
        return convert_py(
            *(["-m"] if multirun else []),
            "experiment=debug",
            f"experiment.checkpoint_dir={root}",
            named,
            *model_overrides(TINY),
            *args,
            cwd=tmp_path,
        )

    sweep = run("experiment.step=5,7", multirun=True)
    assert sweep.returncode == 0, sweep.stdout[-2000:] + sweep.stderr[-2000:]
    assert sorted(p.name for p in root.glob("*.pt")) == ["model_step5.pt", "model_step7.pt"]
    for p in root.glob("*.pt"):
        p.unlink()
    latest = run("experiment.step=latest")
    assert latest.returncode == 0, latest.stderr[-2000:]
    assert sorted(p.name for p in root.glob("*.pt")) == ["model_step7.pt"]
    missing = run(f"experiment.checkpoint_dir={tmp_path / 'nothing'}")
    assert missing.returncode == 1 and "does not exist" in missing.stderr, missing.stderr[-2000:]
    assert "Traceback" not in missing.stderr
    # The step resolved straight in the output's path, not through another interpolation.
    literal = run(
        f"experiment.checkpoint_dir={tmp_path / 'nothing'}",
        f"experiment.output={tmp_path}/model_step${{resolved_step:}}.pt",
    )
    assert literal.returncode == 1 and "does not exist" in literal.stderr, literal.stderr
    assert "Invalid configuration" not in literal.stderr and "full_key" not in literal.stderr


def test_the_sweep_summary_shows_the_step_and_the_warnings(tiny_checkpoint, tmp_path):
    """step=latest passes over an unfinished newer save: the summary's row shows the step
    converted, and the summary repeats the run's warnings (that one, and the head counts the
    weights cannot confirm)."""
    root = tmp_path / "checkpoint"
    root.mkdir()
    (root / "step-5").symlink_to(tiny_checkpoint / "step-5")
    unfinished = shutil.ignore_patterns(".metadata")  # the shards, but not the index
    shutil.copytree(tiny_checkpoint / "step-5", root / "step-9", ignore=unfinished)
    run = convert_py(
        "-m",
        "experiment=debug",
        f"experiment.checkpoint_dir={root}",
        f"experiment.output={tmp_path / 'out.pt'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *model_overrides(TINY),
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    table = run.stdout[run.stdout.index("experiment  status") :]
    assert re.search(r"^debug +converted +5 +", table, flags=re.M), table
    assert "debug (job 0) warning: step-9 in" in table and "unfinished save" in table, table
    assert "debug (job 0) warning: n_heads=4 and n_kv_heads=4 are taken from" in table, table


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_checkpoint, tmp_path):
    """The layout, each tensor with its source, what is left out, the size, and an estimate
    from the last conversion measured here (none yet in a fresh cache folder); no file."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = [
        "experiment=debug",
        f"experiment.checkpoint_dir={tiny_checkpoint}",
        f"experiment.output={tmp_path / 'out' / 'model.pt'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *model_overrides(TINY),
    ]
    run = convert_py(*args, "dry_run=true", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "layout: llama3 #2937" in run.stdout, run.stdout
    assert (
        "layers.0.attention.wq.weight" in run.stdout
        and "<- layers.0.attention.qkv_linear.wq.weight" in run.stdout
    )
    # tok_embeddings, norm, output, and nine weights per layer
    assert f"{3 + 9 * TINY.n_layers} tensors" in run.stdout
    assert "no conversion measured on this machine yet" in run.stdout
    assert "nothing was written (dry_run=true)" in run.stdout
    assert not (tmp_path / "out").exists()

    assert convert_py(*args, env=env).returncode == 0
    again = convert_py(*args, "dry_run=true", "force=true", env=env)
    assert "at the last measured" in again.stdout and "MB/s (debug," in again.stdout, again.stdout


def test_an_existing_output_says_why_it_is_not_this_conversion(tiny_checkpoint, tmp_path):
    """Skipped when up to date; force=true converts again; otherwise the refusal names which of
    a newer step, another output_format or changed bytes it is."""
    root = tmp_path / "checkpoint"
    root.mkdir()
    (root / "step-5").symlink_to(tiny_checkpoint / "step-5")
    out = tmp_path / "out" / "model.pt"

    def run(*args: str) -> CompletedProcess:
        return convert(root, tmp_path, *args)

    assert run("experiment.step=5").returncode == 0
    again = run("experiment.step=5")
    assert again.returncode == 0 and "is up to date" in again.stderr, again.stderr[-2000:]
    before = out.stat().st_mtime_ns
    forced = run("experiment.step=5", "force=true")
    assert forced.returncode == 0 and out.stat().st_mtime_ns != before, forced.stderr[-2000:]

    shutil.copytree(tiny_checkpoint / "step-5", root / "step-7")
    newer = run()  # step=latest is now step 7
    assert newer.returncode == 1
    assert f"it was converted from {root / 'step-5'}, this run reads" in newer.stderr
    other = run("experiment.step=5", "output_format=torchtune")
    assert "its output_format.name was meta, this run's is torchtune" in other.stderr, other.stderr
    with out.open("r+b") as f:  # one byte inside the last tensor's data
        f.seek(-200, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    changed = run("experiment.step=5")
    assert changed.returncode == 1
    assert "its files no longer match its manifest" in changed.stderr, changed.stderr[-2000:]
    assert "manifest.json (model.pt changed)" in changed.stderr
    for refused in (newer, other, changed):
        assert "Set overwrite=true to replace it" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_the_recipe_snippet_uses_public_builders_and_the_models_max_seq_len(
    tiny_checkpoint, tmp_path
):
    """The emitted .torchtune.yaml: a public torchtune builder (not _component_builders), the
    experiment's max_seq_len, and an output_dir of this output alone (torchtune refuses one
    inside its checkpoint_dir, so it lies beside the output's folder)."""
    run = convert(tiny_checkpoint, tmp_path, "experiment.model.max_seq_len=4096")
    assert run.returncode == 0, run.stderr[-2000:]
    snippet = yaml.safe_load((tmp_path / "out" / "model.pt.torchtune.yaml").read_text())
    builder = snippet["model"]["_component_"]
    assert re.fullmatch(r"torchtune\.models\.llama3(_[12])?\.llama3(_[12])?", builder), builder
    assert snippet["model"]["max_seq_len"] == 4096
    assert snippet["checkpointer"]["output_dir"] == str(tmp_path / "out_torchtune" / "model")


def test_rope_factors_torchtune_cannot_build_leave_the_model_section_out(tiny_checkpoint, tmp_path):
    """torchtune's llama3 RoPE fixes low/high frequency factors of 1 and 4: with others the
    snippet keeps the checkpointer (which loads the weights) and has no model: section, and the
    log says why; config.json would carry them for transformers."""
    run = convert(tiny_checkpoint, tmp_path, "experiment.model.rope_high_freq_factor=2.0")
    assert run.returncode == 0, run.stderr[-2000:]
    text = (tmp_path / "out" / "model.pt.torchtune.yaml").read_text()
    snippet = yaml.safe_load(text)
    assert "model" not in snippet and snippet["checkpointer"]["checkpoint_files"] == ["model.pt"]
    assert "No model: section: torchtune has no builder of this model" in text
    assert "its llama3 RoPE fixes them at 1, 4 and 8192" in run.stderr


def test_a_job_that_left_no_result_fails_the_sweep(tmp_path, capsys, caplog):
    """A job killed before it ended (out of memory, by the scheduler) leaves no result: the
    summary of the results that are there is printed, and the sweep fails, saying how many
    are missing. The callback as Hydra calls it, on the composed config of a two-job sweep."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from converter.job import JobResult, Status, status_dir
    from converter.summary import SweepSummary

    status_dir(tmp_path).mkdir()
    done = JobResult("debug", Status.converted, seconds=1.0)
    (status_dir(tmp_path) / "0.json").write_text(done.to_json())
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        config = hydra_compose("convert", ["experiment=debug"], return_hydra_config=True)
        with open_dict(config):
            config.hydra.overrides.task = ["experiment=debug,debug_pretrained"]
            config.hydra.sweep.dir = str(tmp_path)
        with pytest.raises(SystemExit) as exited:
            SweepSummary().on_multirun_end(config)
    assert exited.value.code == 1
    table = capsys.readouterr().out.split()
    assert table[table.index("debug") + 1] == "converted" and "debug_pretrained" not in table
    assert "1 of the sweep's 2 jobs reported no result (job 1: experiment=debug_pretrained)" in (
        caplog.text
    )


def test_a_local_url_is_the_local_file_system(tiny_checkpoint, tmp_path):
    """``local://`` (fsspec's name for it) is read as a plain path is: an output that would
    replace the checkpoint is refused (with overwrite=true too), and files go by mtime."""
    root = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, root)
    before = sorted(p.name for p in (root / "step-5").iterdir())
    refused = convert(
        root,
        tmp_path,
        f"experiment.checkpoint_dir=local://{root}",
        "output_format=hf",
        f"experiment.output={root}",
        "overwrite=true",
    )
    assert refused.returncode == 1 and "holds the source step folder" in refused.stderr
    assert sorted(p.name for p in (root / "step-5").iterdir()) == before
    run = convert(root, tmp_path, f"experiment.checkpoint_dir=local://{root}")
    assert run.returncode == 0, run.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "model.pt.manifest.json").read_text())
    assert manifest["source"]["storage"]["kind"] == "local"
    assert all("mtime_ns" in seen for seen in manifest["source"]["files"].values())
    # The default output, beside the checkpoint: a local URL's path, not a folder named "file:".
    for scheme in ("local://", "file://"):
        beside = convert_py(
            "experiment=debug",
            f"experiment.checkpoint_dir={scheme}{root}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
            *model_overrides(TINY),
            "overwrite=true",
            cwd=tmp_path,
        )
        assert beside.returncode == 0, beside.stderr[-2000:]
        assert (root / "final_model.pt").is_file()
        assert not list(tmp_path.glob("*:")), "a folder named for the URL's scheme"


def test_the_step_an_output_is_named_for_is_the_step_converted(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """``step=latest`` named in the output by ``${resolved_step:}``: a newer save finishing
    right after the name was resolved is not the one converted into that name."""
    from converter import job
    from converter.sources import steps
    from tests.conftest import compose

    root = tmp_path / "checkpoint"
    root.mkdir()
    (root / "step-5").symlink_to(tiny_checkpoint / "step-5")
    resolve = steps.find_step_dir

    def then_a_save_finishes(storage, step):
        found = resolve(storage, step)
        if not (root / "step-7").exists():
            shutil.copytree(tiny_checkpoint / "step-5", root / "step-7")
        return found

    monkeypatch.setattr(steps, "find_step_dir", then_a_save_finishes)  # what the resolver calls
    result = job.run(
        compose(
            [
                "experiment=debug",
                f"experiment.checkpoint_dir={root}",
                "experiment.output=${experiment.checkpoint_dir}/model_step${resolved_step:}.pt",
                *model_overrides(TINY),
            ]
        )
    )
    assert (root / "step-7").exists()
    assert result.status == "converted" and result.step == 5, result.error
    assert result.output == str(root / "model_step5.pt")


def _convert_tiny(root: Path, out: Path) -> JobResult:
    """The TINY checkpoint in ``root`` converted to ``out`` in this process."""
    from converter import job
    from tests.conftest import compose

    return job.run(
        compose(
            [
                "experiment=debug",
                f"experiment.checkpoint_dir={root}",
                f"experiment.output={out}",
                *model_overrides(TINY),
            ]
        )
    )


def test_a_shard_cut_short_during_the_conversion_is_named(tiny_checkpoint, tmp_path, monkeypatch):
    """A shard truncated in place after the index was read (cp or rsync --inplace over it):
    the reads or writes that fail are explained by the change, not blamed on the output."""
    from converter import conversion

    root = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, root)
    shards = sorted((root / "step-5").glob("*.distcp"))
    fill = conversion.convert_tensors

    def cut_short_meanwhile(*args, **kwargs):
        for shard in shards:
            os.truncate(shard, shard.stat().st_size // 3)
        return fill(*args, **kwargs)

    monkeypatch.setattr(conversion, "convert_tensors", cut_short_meanwhile)
    out = tmp_path / "out" / "model.pt"
    result = _convert_tiny(root, out)
    assert result.status == "failed"
    assert f"{shards[0]} changed while it was being converted (it is rewritten)" in result.error
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_a_shard_rewritten_during_the_conversion_fails_it(tiny_checkpoint, tmp_path, monkeypatch):
    """A local shard rewritten while its tensors are read (another job saving into the step
    folder) could mix two saves in the output: the files are listed again once all is read,
    and the conversion fails, keeping nothing."""
    from converter import conversion

    root = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, root)
    shard = sorted((root / "step-5").glob("*.distcp"))[0]
    fill = conversion.convert_tensors

    def rewritten_meanwhile(*args, **kwargs):
        filled = fill(*args, **kwargs)
        shard.write_bytes(shard.read_bytes())  # the same size, a new mtime
        return filled

    monkeypatch.setattr(conversion, "convert_tensors", rewritten_meanwhile)
    out = tmp_path / "out" / "model.pt"
    result = _convert_tiny(root, out)
    assert result.status == "failed"
    assert f"{shard} changed while it was being converted (it is rewritten)" in result.error
    assert not out.parent.exists() or not list(out.parent.iterdir())
