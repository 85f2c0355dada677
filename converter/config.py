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


def _doc(default: Any, help: str) -> Any:
    """A field's default with a line of meaning, which ``python convert.py --help`` lists."""
    return field(default=default, metadata={"help": help})


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

    n_heads: int = _doc(MISSING, "attention heads of the trained model (splits fused QKV)")
    n_kv_heads: int | None = _doc(None, "key/value heads; null: as n_heads (no grouped-query)")
    tied_embeddings: bool = _doc(False, "the output head shares the token embeddings' weights")
    dim: int | None = _doc(None, "model width; checked against the weights")
    n_layers: int | None = _doc(None, "transformer blocks; checked against the weights")
    vocab_size: int | None = _doc(None, "vocabulary size; checked against the weights")
    hidden_dim: int | None = _doc(None, "feed-forward width; checked against the weights")
    norm_eps: float = _doc(1e-5, "RMSNorm epsilon, for the emitted torchtune YAML")
    rope_theta: float = _doc(500000.0, "RoPE base, for the emitted torchtune YAML")
    # Llama 3.1-style RoPE frequency scaling, as torchtitan's llama3 models use ("llama").
    rope_scaling: bool = _doc(True, "Llama 3.1-style RoPE scaling, for the torchtune YAML")
    max_seq_len: int = _doc(131072, "context length, for the emitted torchtune YAML")

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

    name: str = _doc(MISSING, "the experiment's name, in logs, outputs and the summary")
    checkpoint_dir: str = _doc(MISSING, "the folder holding the step-<N> folders")
    # OmegaConf reads typing.Union, not `|`.
    step: Union[int, str] = _doc("latest", "a step number, or latest (newest complete)")  # noqa: UP007
    export_dtype: ExportDtype = _doc(ExportDtype.bfloat16, "dtype of the weights written")
    output: str = _doc("${.checkpoint_dir}/final_model.pt", "the .pt file to write")
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
    output_format: OutputFormat = _doc(
        OutputFormat.meta, "key names: meta or torchtune (the checkpointer that loads it)"
    )
    overwrite: bool = _doc(False, "replace an existing output whose source or settings differ")
    force: bool = _doc(False, "convert even when the output is up to date (a forced rebuild)")
    verify: bool = _doc(True, "read the output back and check every tensor's bytes")
    allow_nonfinite: bool = _doc(False, "accept NaN/Inf weights instead of failing on them")
    batch_mb: int = _doc(256, "tensor bytes held in memory at once, across all workers")
    workers: int = _doc(1, "threads filling disjoint tensors of the output concurrently")
    debug: bool = _doc(False, "show full tracebacks for conversion errors")

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


def settings_help(schema: type = ConvertConfig, prefix: str = "") -> list[str]:
    """``key (type, default): meaning`` for every setting of the schema, nested ones dotted."""
    lines = []
    types = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = types[f.name]
        if dataclasses.is_dataclass(kind):
            lines += settings_help(kind, f"{prefix}{f.name}.")
            continue
        value = f.default.value if isinstance(f.default, Enum) else f.default
        if isinstance(value, bool) or value is None:
            value = {True: "true", False: "false", None: "null"}[value]
        default = "required" if f.default is MISSING else f"default {value}"
        if isinstance(kind, type) and issubclass(kind, Enum):
            default += f"; one of {', '.join(m.value for m in kind)}"
        lines.append(f"  {prefix}{f.name} ({default}): {f.metadata.get('help', '')}")
    return lines


_HELP_TEMPLATE = """titan2tune: convert torchtitan DCP checkpoints (sharded PyTorch Distributed
Checkpoints) into one consolidated .pt per run that torchtune loads as it is.

  python convert.py experiment=debug [key=value ...]
  python convert.py -m experiment=debug,500M,debug_pretrained [hydra/launcher=slurm]

Config groups (choose with group=option; experiment is required):
$APP_CONFIG_GROUPS
Settings (override with key=value; an unknown key is an error):
{settings}

Your own experiments: a YAML per run in a folder of yours, added with --config-dir <folder>
(it holds experiment/<name>.yaml). The composed config: --cfg job. Hydra's own options:
--hydra-help. Shell completion: python convert.py -sc install=bash. See README.md.
"""


def resolved_step(*, _root_: Any) -> int:
    """``${resolved_step:}`` in a setting: the step number that ``experiment.step`` resolves
    to (``latest`` included), so that an output can be named for the step converted, as in
    ``experiment.output='${experiment.checkpoint_dir}/model_step${resolved_step:}.pt'``."""
    from converter.steps import find_step_dir

    experiment = _root_.experiment
    return find_step_dir(local_path(experiment.checkpoint_dir), experiment.step)[0]


def register_configs() -> None:
    """Registers the schema the primary config ``conf/convert.yaml`` extends, and the help
    that ``--help`` prints, written from the schema's own field descriptions."""
    store = ConfigStore.instance()
    store.store(name="convert_schema", node=ConvertConfig)
    OmegaConf.register_new_resolver("resolved_step", resolved_step, replace=True)
    # A default such as ${.checkpoint_dir} is shown as written: escaped for OmegaConf (\${),
    # which resolves the template, then for string.Template ($$), which fills it in.
    settings = "\n".join(settings_help()).replace("${", "$\\${")
    template = _HELP_TEMPLATE.format(settings=settings)
    store.store(
        group="hydra/help",
        name="titan2tune",
        node={"app_name": "titan2tune", "header": "", "footer": "", "template": template},
    )


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
