"""Typed, structured configs for the converter, registered in Hydra's ConfigStore.

The YAML files in ``conf/`` are merged onto these dataclasses, so a misspelt key or a value of
the wrong type (``export_dtype=bf17``, ``step=1.5``) fails when Hydra composes the config, before
any checkpoint is touched. Constraints that a type cannot express (``step=-3``) are checked by
``check()``, which runs as the job turns the composed config into these objects, before it reads
anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Union

from hydra.core.config_store import ConfigStore
from hydra.utils import to_absolute_path
from omegaconf import MISSING, OmegaConf


class ExportDtype(Enum):
    """The dtype floating-point weights are written in; ``keep`` writes them as stored."""

    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"
    keep = "keep"

    def __str__(self) -> str:  # so ${experiment.export_dtype} interpolates as "bfloat16"
        return self.value


class OutputFormat(Enum):
    """The key naming of the output file, one per torchtune checkpointer that loads it."""

    meta = "meta"  # torchtune.training.FullModelMetaCheckpointer
    torchtune = "torchtune"  # torchtune.training.FullModelTorchTuneCheckpointer

    def __str__(self) -> str:  # so ${output_format} interpolates as "meta"
        return self.value


@dataclass
class ModelConfig:
    """What the converter needs to know about the model beyond what shapes tell.

    ``n_heads`` and ``n_kv_heads`` split torchtitan's fused QKV weight (shapes alone do not
    determine the split). The architecture fields are optional: when all are set, the emitted
    ``<output>.torchtune.yaml`` also carries a ``model:`` builder section.
    """

    n_heads: int = MISSING
    n_kv_heads: int | None = None  # null: same as n_heads (no grouped-query attention)
    tied_embeddings: bool = False
    dim: int | None = None
    n_layers: int | None = None
    vocab_size: int | None = None
    hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1-style RoPE frequency scaling, as torchtitan's llama3 models use ("llama").
    rope_scaling: bool = True
    max_seq_len: int = 131072

    def check(self) -> None:
        if self.n_heads <= 0:
            raise ValueError(f"experiment.model.n_heads must be positive, got {self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(
                f"experiment.model.n_kv_heads={self.n_kv_heads} must be a positive divisor of "
                f"n_heads={self.n_heads}"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


@dataclass
class ExperimentConfig:
    """One training run whose checkpoint is converted: where it is and how to export it."""

    name: str = MISSING
    checkpoint_dir: str = MISSING  # the folder holding step-<N> folders
    step: Union[int, str] = "latest"  # noqa: UP007 (OmegaConf reads typing.Union, not `|`)
    export_dtype: ExportDtype = ExportDtype.bfloat16
    output: str = "${.checkpoint_dir}/final_model.pt"
    model: ModelConfig = field(default_factory=ModelConfig)

    def check(self) -> None:
        if isinstance(self.step, str) and self.step != "latest":
            raise ValueError(
                f"experiment.step must be a step number or 'latest', got {self.step!r}"
            )
        if isinstance(self.step, int) and self.step < 0:
            raise ValueError(f"experiment.step must be >= 0 or 'latest', got {self.step}")
        for key in ("checkpoint_dir", "output"):
            if "://" in getattr(self, key):
                raise ValueError(
                    f"experiment.{key}={getattr(self, key)!r} is a URL, but this converter reads "
                    "and writes local paths only: copy the step folder to a local or mounted "
                    "file system first, and write the output to one"
                )
        if not self.output.endswith(".pt"):
            raise ValueError(f"experiment.output must be a .pt path, got {self.output!r}")
        self.model.check()


@dataclass
class ConvertConfig:
    """The whole job: one experiment and how to write it."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    output_format: OutputFormat = OutputFormat.meta
    overwrite: bool = False  # replace an existing output whose source or settings differ
    verify: bool = True  # read the output back and check every tensor's bytes
    allow_nonfinite: bool = False  # accept NaN/Inf weights instead of failing on them
    batch_mb: int = 256  # tensor bytes held in memory at once, across all workers
    workers: int = 1  # threads filling disjoint tensors of the output concurrently
    debug: bool = False  # show full tracebacks for conversion errors

    def check(self) -> None:
        if self.batch_mb <= 0:
            raise ValueError(f"batch_mb must be positive, got {self.batch_mb}")
        if self.workers <= 0:
            raise ValueError(f"workers must be positive, got {self.workers}")
        self.experiment.check()


def local_path(value: str) -> Path:
    """A path setting as the job uses it: ``~`` expanded, then relative to where the user ran
    the command (Hydra changes the working folder of a job)."""
    return Path(to_absolute_path(os.path.expanduser(value)))


def register_configs() -> None:
    """Registers the schema the primary config ``conf/convert.yaml`` extends."""
    ConfigStore.instance().store(name="convert_schema", node=ConvertConfig)


def unknown_keys(cfg: Any, schema: type = ConvertConfig, prefix: str = "") -> list[str]:
    """Keys of ``cfg`` that the schema does not define, each with a did-you-mean and the valid
    keys. Hydra's ``+key=value`` adds a key the schema lacks; without this check a typo such as
    ``+experiment.stpe=10`` would be accepted and ignored."""
    fields = [f.name for f in dataclasses.fields(schema)]
    types = typing.get_type_hints(schema)
    problems = []
    for key in cfg:
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(
                f"unknown key {name}{hint}; the keys of {prefix.rstrip('.') or 'the config'} "
                f"are {', '.join(fields)}"
            )
            continue
        nested = types[key]
        if dataclasses.is_dataclass(nested) and OmegaConf.is_dict(cfg[key]):
            problems += unknown_keys(cfg[key], nested, f"{name}.")
    return problems


def to_object(cfg: Any) -> ConvertConfig:
    """Turns a composed DictConfig into dataclasses and runs their value checks."""
    if problems := unknown_keys(cfg):
        raise ValueError(
            "; ".join(problems)
            + ". A '+' in front of an override does not make a key known: only the keys of "
            "the typed schema (converter/config.py) are read"
        )
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, ConvertConfig)
    obj.check()
    return obj
