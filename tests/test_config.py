"""Configuration: typed composition, overrides from the command line, errors that list choices."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from converter.config import ExportDtype, to_object
from converter.models.llama3 import Llama3Config
from tests.conftest import REPO, compose


def test_experiments_compose_to_typed_configs():
    for name in ("debug", "500M", "debug_pretrained"):
        conf = to_object(compose([f"experiment={name}"]))
        assert conf.experiment.name == name
        assert conf.experiment.checkpoint_dir.endswith(f"checkpoint_{name}")
        assert conf.experiment.output == f"{conf.experiment.checkpoint_dir}/final_model.pt"
        assert conf.output_format.name == "meta"
        assert isinstance(conf.experiment.model, Llama3Config)
        assert conf.overwrite is False and conf.verify is True


def test_every_documented_override_applies():
    conf = to_object(
        compose(
            [
                "experiment=debug",
                "experiment.checkpoint_dir=/data/run7/checkpoint",
                "experiment.step=1200",
                "experiment.export_dtype=float16",
                "experiment.output=/data/out/model.pt",
                "experiment.model.n_kv_heads=4",
                "experiment.model.tied_embeddings=true",
                "output_format=torchtune",
                "overwrite=true",
                "verify=false",
                "workers=2",
            ]
        )
    )
    exp = conf.experiment
    assert (exp.checkpoint_dir, exp.step, exp.output) == (
        "/data/run7/checkpoint",
        1200,
        "/data/out/model.pt",
    )
    assert exp.export_dtype is ExportDtype.float16 and exp.model.kv_heads == 4
    assert exp.model.tied_embeddings and conf.output_format.name == "torchtune"
    assert conf.overwrite and not conf.verify and conf.workers == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("experiment.export_dtype=bf17", "expected one of [bfloat16, float16, float32, keep]"),
        ("output_format=safetensors", "Could not find 'output_format/safetensors'"),
        ("experiment.step=1.5", "incompatible with type hint"),
        ("experiment.stepp=3", "Key 'stepp' not in 'ExperimentConfig'"),
        ("workers=many", "Value 'many' of type 'str' could not be converted to Integer"),
    ],
)
def test_bad_values_fail_at_composition(override, message):
    with pytest.raises((ValidationError, ConfigCompositionException)) as e:
        compose(["experiment=debug", override])
    assert message in str(e.value) or message in str(e.value.__cause__)


@pytest.mark.parametrize(
    "override, message",
    [
        ("experiment.step=-3", "experiment.step must be >= 0 or 'latest', got -3"),
        ("experiment.step=newest", "must be a step number or 'latest', got 'newest'"),
        ("experiment.step=020", "experiment.step is the text '020', not a number"),
        ("experiment.model.rope_theta=0", "experiment.model.rope_theta must be positive and"),
        ("experiment.model.rope_theta=nan", "rope_theta must be positive and finite, got nan"),
        ("experiment.model.norm_eps=-1", "experiment.model.norm_eps must be positive and finite"),
        ("experiment.model.norm_eps=inf", "norm_eps must be positive and finite, got inf"),
        ("experiment.model.rope_high_freq_factor=nan", "rope_high_freq_factor must be positive"),
        ("experiment.model.max_seq_len=0", "experiment.model.max_seq_len must be positive"),
        ("experiment.model.rope_scaling_factor=0", "rope_scaling_factor must be positive"),
        ("experiment.model.rope_high_freq_factor=1", "must be above rope_low_freq_factor=1.0"),
        ("experiment.step='20'", "give experiment.step=20 (in a YAML file, step: 20, unquoted)"),
        ("experiment.model.n_kv_heads=3", "n_kv_heads=3 must be a positive divisor of n_heads=16"),
        ("batch_mb=0", "batch_mb must be positive"),
        ("experiment.model.n_heads=null", "n_heads must be a positive number, got None"),
    ],
)
def test_values_a_type_cannot_express_fail_before_any_work(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_object(compose(["experiment=debug", override]))


@pytest.mark.parametrize("model", ["llama3/debugmodel", "qwen3/0.6B", "qwen3/debugmodel_moe"])
def test_every_family_refuses_a_zero_rope_base(model):
    """A setting no tensor holds, written into config.json as given: rope_theta=0 gave NaN
    logits in transformers, with exit 0."""
    overrides = ["experiment=debug", f"experiment/model={model}", "experiment.model.rope_theta=0"]
    with pytest.raises(ValueError, match="experiment.model.rope_theta must be positive and finite"):
        to_object(compose(overrides))


@pytest.mark.slow  # a subprocess
def test_cli_unknown_experiment_lists_the_choices():
    run = subprocess.run(
        [sys.executable, "convert.py", "experiment=nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "Could not find 'experiment/nope'" in run.stderr
    for name in ("500M", "debug", "debug_pretrained"):
        assert name in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.slow  # a subprocess
def test_cli_without_experiment_asks_for_one():
    run = subprocess.run(
        [sys.executable, "convert.py"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    assert "You must specify 'experiment'" in run.stderr


def test_a_preset_is_chosen_on_the_command_line_and_typed():
    """``experiment/model=<family>/<flavor>`` replaces the experiment's model with a preset of
    torchtitan's registry; a field the preset's family lacks is an error at composition."""
    conf = to_object(compose(["experiment=debug", "experiment/model=llama3/8B"]))
    model = conf.experiment.model
    assert isinstance(model, Llama3Config) and model.flavor == "8B"
    assert (model.dim, model.n_layers, model.n_heads, model.kv_heads) == (4096, 32, 32, 8)
    assert (model.vocab_size, model.hidden_dim, model.rope_scaling_factor) == (128256, 14336, 8.0)
    with pytest.raises((ValidationError, ConfigCompositionException)) as e:
        compose(["experiment=debug", "experiment.model.num_experts=8"])
    assert "num_experts" in str(e.value) + str(e.value.__cause__)


@pytest.mark.slow  # a subprocess
def test_cfg_job_prints_the_preset():
    run = subprocess.run(
        [
            sys.executable,
            "convert.py",
            "experiment=debug",
            "experiment/model=llama3/8B",
            "--cfg",
            "job",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "flavor: 8B" in run.stdout and "dim: 4096" in run.stdout, run.stdout
    assert "hidden_dim: 14336" in run.stdout
