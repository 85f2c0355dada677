"""Configuration: typed composition, overrides from the command line, errors that list choices."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from converter.config import ExportDtype, OutputFormat, to_object
from tests.conftest import REPO, compose


def test_experiments_compose_to_typed_configs():
    for name in ("debug", "500M", "debug_pretrained"):
        conf = to_object(compose([f"experiment={name}"]))
        assert conf.experiment.name == name
        assert conf.experiment.checkpoint_dir.endswith(f"checkpoint_{name}")
        assert conf.experiment.output == f"{conf.experiment.checkpoint_dir}/final_model.pt"
        assert conf.output_format is OutputFormat.meta
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
    assert exp.model.tied_embeddings and conf.output_format is OutputFormat.torchtune
    assert conf.overwrite and not conf.verify and conf.workers == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("experiment.export_dtype=bf17", "expected one of [bfloat16, float16, float32, keep]"),
        ("output_format=safetensors", "expected one of [meta, torchtune]"),
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
        ("experiment.model.n_kv_heads=3", "n_kv_heads=3 must be a positive divisor of n_heads=16"),
        ("batch_mb=0", "batch_mb must be positive"),
    ],
)
def test_values_a_type_cannot_express_fail_before_any_work(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_object(compose(["experiment=debug", override]))


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


def test_cli_without_experiment_asks_for_one():
    run = subprocess.run(
        [sys.executable, "convert.py"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    assert "You must specify 'experiment'" in run.stderr
