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
from omegaconf.errors import OmegaConfBaseException

from converter.formats import FORMATS
from converter.formats.base import FormatConfig
from converter.models import FAMILIES
from converter.models.base import ModelConfig
from converter.sources.storage import STORAGE_RETRY_S, local_part


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


@dataclass
class ExperimentConfig:
    """One training run whose checkpoint is converted: where it is and how to export it."""

    name: str = _doc(MISSING, "the experiment's name, in logs, outputs and the summary")
    checkpoint_dir: str = _doc(
        MISSING, "the folder holding the step-<N> folders: a path, or an fsspec URL (s3://...)"
    )
    storage_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "for a URL checkpoint_dir: options for fsspec's backend, e.g. "
            "+experiment.storage_options.endpoint_url=http://... (credentials are best left "
            "to the environment: AWS_PROFILE, ...)"
        },
    )
    storage_retry_s: float = _doc(
        STORAGE_RETRY_S,
        "for a URL checkpoint_dir: seconds one request is retried while the store throttles, "
        "resets or does not answer",
    )
    # OmegaConf reads typing.Union, not `|`.
    step: Union[int, str] = _doc("latest", "a step number, or latest (newest complete)")  # noqa: UP007
    export_dtype: ExportDtype = _doc(ExportDtype.bfloat16, "dtype of the weights written")
    output: str = _doc(
        "${.checkpoint_dir}/${output_format.output_name}",
        "the output (a .pt file, or a folder for hf); local",
    )
    tokenizer_dir: str | None = _doc(  # noqa: UP007
        None, "torchtitan's hf_assets_path: tokenizer files copied into an hf output"
    )
    # The preset brings its family's config, a subclass. Until then the fields every family
    # has: a sweep's launching process, which composes no experiment, takes overrides of them.
    model: ModelConfig = field(
        default_factory=ModelConfig,
        metadata={"help": "the model: a preset, experiment/model=<family>/<flavor>"},
    )

    def check(self) -> None:
        if isinstance(self.step, str) and self.step.isdigit():
            raise ValueError(
                f"experiment.step is the text {self.step!r}, not a number (quoted, or with a "
                f"leading zero): give experiment.step={int(self.step)} (in a YAML file, "
                f"step: {int(self.step)}, unquoted)"
            )
        if isinstance(self.step, str) and self.step != "latest":
            raise ValueError(
                f"experiment.step must be a step number or 'latest', got {self.step!r}"
            )
        if self.storage_retry_s < 0:
            raise ValueError(
                f"experiment.storage_retry_s must be >= 0 (0: no retries), got "
                f"{self.storage_retry_s}"
            )
        if isinstance(self.step, int) and self.step < 0:
            raise ValueError(f"experiment.step must be >= 0 or 'latest', got {self.step}")
        # The checkpoint may lie in object storage; what is written, and read beside it,
        # stays local, where torchtune and the Hugging Face loaders read it.
        for key in ("output", "tokenizer_dir"):
            value = getattr(self, key)
            if value is not None and local_part(value) is None:
                raise ValueError(
                    f"experiment.{key}={value!r} is a URL, but the converter writes its output "
                    "and reads the tokenizer on a local or mounted file system, where "
                    "torchtune and the Hugging Face loaders read them: set it to a local path "
                    "(with a URL checkpoint_dir the output has no default beside it)"
                )
        self.model.check()


@dataclass
class ConvertConfig:
    """The whole job: one experiment and how to write it."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    output_format: FormatConfig = _doc(
        MISSING, "the output: meta, torchtune (.pt for torchtune) or hf (a Hugging Face folder)"
    )
    overwrite: bool = _doc(False, "replace an existing output whose source or settings differ")
    force: bool = _doc(False, "convert even when the output is up to date (a forced rebuild)")
    verify: bool = _doc(True, "read the output back and check every tensor's bytes")
    sha256: bool = _doc(False, "also record the sha256 of each output file in the manifest")
    dry_run: bool = _doc(
        False, "print the plan (layout, tensors, what is left out, size, time); write nothing"
    )
    allow_nonfinite: bool = _doc(False, "accept NaN/Inf weights instead of failing on them")
    batch_mb: int = _doc(256, "tensor bytes held in memory at once, across all workers")
    workers: int = _doc(2, "threads filling disjoint tensors of the output concurrently")
    debug: bool = _doc(False, "show full tracebacks for conversion errors")

    def check(self) -> None:
        if self.batch_mb <= 0:
            raise ValueError(f"batch_mb must be positive, got {self.batch_mb}")
        if self.workers <= 0:
            raise ValueError(f"workers must be positive, got {self.workers}")
        self.experiment.check()
        self.output_format.check()
        FORMATS[self.output_format.name].check_output(self.experiment.output)


def local_path(value: str) -> Path:
    """A path setting as the job uses it (a local URL's path): ``~`` expanded, then relative to
    where the user ran the command (Hydra changes the working folder of a job)."""
    path = local_part(value)  # a store's URL: refused by check(), before any job uses it
    return Path(to_absolute_path(os.path.expanduser(value if path is None else path)))


def settings_help(schema: type = ConvertConfig, prefix: str = "") -> list[str]:
    """``key (type, default): meaning`` for every setting of the schema, nested ones dotted;
    the model's and the output format's for each family and format."""
    lines = []
    types = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = types[f.name]
        if kind in _CHOICES:
            for name, choice in _CHOICES[kind]().items():
                lines.append(f"  {prefix}{f.name}: {f.metadata.get('help', '')}; as {name}:")
                lines += settings_help(choice, f"{prefix}{f.name}.")
            continue
        if dataclasses.is_dataclass(kind):
            lines += settings_help(kind, f"{prefix}{f.name}.")
            continue
        if f.name in ("family", "name") and kind is str and f.default is not MISSING:
            continue  # fixed by the family or format chosen
        value = f.default.value if isinstance(f.default, Enum) else f.default
        if f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        if isinstance(value, bool) or value is None:
            value = {True: "true", False: "false", None: "null"}[value]
        default = "required" if f.default is MISSING else f"default {value}"
        if isinstance(kind, type) and issubclass(kind, Enum):
            default += f"; one of {', '.join(m.value for m in kind)}"
        lines.append(f"  {prefix}{f.name} ({default}): {f.metadata.get('help', '')}")
    return lines


_HELP_TEMPLATE = """titan2tune: convert torchtitan DCP checkpoints (sharded PyTorch Distributed
Checkpoints) into one consolidated .pt per run that torchtune loads as it is, or a Hugging Face
folder (output_format=hf).

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


# The steps ``${resolved_step:}`` found in this job, by (checkpoint_dir, step): the job then
# converts the very step its output is named for, though a newer save may finish in between.
RESOLVED_STEPS: dict[tuple[str, str], int] = {}


def resolved_step(*, _root_: Any) -> int:
    """``${resolved_step:}`` in a setting: the step number that ``experiment.step`` resolves
    to (``latest`` included), so that an output can be named for the step converted, as in
    ``experiment.output='${experiment.checkpoint_dir}/model_step${resolved_step:}.pt'``."""
    from converter.sources import open_storage
    from converter.sources.steps import find_step_dir

    experiment = _root_.experiment
    asked = (str(experiment.checkpoint_dir), str(experiment.step))
    if asked not in RESOLVED_STEPS:  # the first answer holds for every setting of the job
        options = OmegaConf.to_container(experiment.storage_options, resolve=True)
        retry_s = experiment.storage_retry_s
        with open_storage(experiment.checkpoint_dir, options, retry_s) as storage:
            RESOLVED_STEPS[asked] = find_step_dir(storage, experiment.step)[0]
    return RESOLVED_STEPS[asked]


def _families() -> dict[str, type]:
    return {name: family.config for name, family in FAMILIES.items()}


def _formats() -> dict[str, type]:
    return {name: fmt.options for name, fmt in FORMATS.items()}


# Fields whose type depends on a choice: the model's family, the output's format.
_CHOICES = {ModelConfig: _families, FormatConfig: _formats}


def register_configs() -> None:
    """Registers the schema the primary config ``conf/convert.yaml`` extends, each family's
    model config (``experiment/model=<family>``, which its presets extend) and each format's
    options (``schema/output_format/<name>``, which ``conf/output_format/<name>.yaml``
    extends), and the help that ``--help`` prints, written from the fields' descriptions."""
    store = ConfigStore.instance()
    store.store(name="convert_schema", node=ConvertConfig)
    for name, config in _families().items():
        store.store(group="experiment/model", name=name, node=config)
    for name, options in _formats().items():
        store.store(group="schema/output_format", name=name, node=options)
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


def _typed(cfg: Any) -> Any:
    """``cfg`` typed by the schema. Hydra composes the config against it, but a job's saved
    config (``.hydra/config.yaml``) given back as the primary one (``--config-dir
    <job>/.hydra --config-name config``, to run that job again) is plain YAML: it is typed
    here, with the classes its model's ``family`` and its format's ``name`` choose."""
    if OmegaConf.get_type(cfg) is ConvertConfig:
        return cfg
    schema = OmegaConf.structured(ConvertConfig)
    if (family := OmegaConf.select(cfg, "experiment.model.family")) in FAMILIES:
        schema.experiment.model = OmegaConf.structured(FAMILIES[family].config)
    if (name := OmegaConf.select(cfg, "output_format.name")) in FORMATS:
        schema.output_format = OmegaConf.structured(FORMATS[name].options)
    try:
        return OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as e:
        raise ValueError(f"the config does not fit the schema: {e}") from e


def unknown_keys(cfg: Any, schema: type = ConvertConfig, prefix: str = "") -> list[str]:
    """Keys of ``cfg`` that the schema does not define, each with a did-you-mean and the valid
    keys. Hydra's ``+key=value`` adds a key the schema lacks; without this check a typo such as
    ``+experiment.stpe=10`` would be accepted and ignored. A node typed by a subclass (a
    family's model config) is checked against that subclass."""
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
            actual = OmegaConf.get_type(cfg[key])
            kind = actual if isinstance(actual, type) and issubclass(actual, nested) else nested
            problems += unknown_keys(cfg[key], kind, f"{name}.")
    return problems


def to_plain(node: Any) -> Any:
    """A config dataclass as plain data (enums by value), for the manifest."""
    return OmegaConf.to_container(OmegaConf.structured(node), resolve=True, enum_to_str=True)


def to_object(cfg: Any) -> ConvertConfig:
    """Turns a composed DictConfig into dataclasses and runs their value checks."""
    cfg = _typed(cfg)
    if problems := unknown_keys(cfg):
        raise ValueError(
            "; ".join(problems)
            + ". A '+' in front of an override does not make a key known: only the keys of "
            "the typed schema (converter/config.py and the family's and format's configs) are "
            "read"
        )
    if OmegaConf.is_missing(cfg.experiment.model, "family"):
        raise ValueError(
            "experiment.model names no model family: an experiment picks its model with "
            "'defaults: [model: llama3/<flavor>, _self_]' (a preset of torchtitan's registry, "
            "conf/experiment/model/) or 'model: llama3' (the family, every field given), or on "
            "the command line with experiment/model=<family>/<flavor>; families: "
            + ", ".join(FAMILIES)
        )
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, ConvertConfig)
    obj.check()
    return obj
