"""The plan step of a conversion: the source's index read and validated, the model family's
plan for the output format, and where the output goes. Every refusal that needs no tensor
data is made here, before anything is written: an output that would overwrite, hold or lie
inside the source, a folder where a file goes (or a file where a folder goes), a folder that
holds a checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from converter.config import ConvertConfig, ExportDtype, local_path
from converter.errors import ConversionError
from converter.formats import FORMATS
from converter.formats.base import OutputFormat
from converter.manifest import manifest_path
from converter.models import FAMILIES, family_of
from converter.models.base import ModelFamily, build_plan
from converter.plan import Plan
from converter.sources.dcp import DcpIndex
from converter.sources.reader import TensorReader
from converter.sources.steps import METADATA_FILE
from converter.sources.storage import LocalStorage, Storage
from converter.tasks import TaskGroup

log = logging.getLogger("titan2tune")

# Workers that hide an object store's latency (measured against a store 50 ms away: 4 workers
# converted in a third of one worker's time; more gained little).
_REMOTE_WORKERS = 4


@dataclass(frozen=True)
class Planned:
    """A validated source and its plan: what every task of the conversion starts from."""

    conf: ConvertConfig
    step: int
    index: DcpIndex
    reader: TensorReader
    family: ModelFamily
    fmt: OutputFormat
    plan: Plan
    arch: Any
    output: Path
    tokenizer_dir: Path | None
    assets: dict[str, Path]  # files the output copies in (name in it -> file)
    # Saved key -> the XXH3-128 of its bytes, of the tensors read whole for the family's value
    # checks (a MoE's expert bias, a tied head, a RoPE table), converted or not.
    checked: dict[str, str]

    @property
    def name(self) -> str:
        return self.conf.experiment.name

    @property
    def output_bytes(self) -> int:
        """The tensors' bytes in the output (its files' headers aside)."""
        return sum(t.dtype.itemsize * math.prod(t.shape) for t in self.plan.tensors)

    def source_bytes(self, keys: Collection[str]) -> int:
        return sum(self.index.tensors[k].nbytes for k in keys)


def plan_conversion(
    conf: ConvertConfig, storage: Storage, step: int, step_dir: str, group: TaskGroup
) -> Planned:
    exp = conf.experiment
    index = DcpIndex(storage, step_dir)
    reader = TensorReader(index)
    fmt = FORMATS[conf.output_format.name]
    given = local_path(exp.output)
    output = given.resolve()
    tokenizer_dir = local_path(exp.tokenizer_dir).resolve() if exp.tokenizer_dir else None
    if isinstance(storage, LocalStorage):
        _check_not_source(given, output, index)
    _check_not_folders(output, fmt)
    _check_not_inside_an_output(output)
    if fmt.folder and tokenizer_dir and tokenizer_dir.is_relative_to(output):
        raise ConversionError(
            f"experiment.output {output} holds experiment.tokenizer_dir {tokenizer_dir}: "
            "replacing the output would delete the tokenizer files it copies. Choose another "
            "output folder."
        )
    family = family_of(exp.model)
    checked: dict[str, str] = {}
    plan, arch = build_plan(
        family,
        exp.model,
        {k: (e.shape, e.dtype) for k, e in index.tensors.items()},
        index.byte_entries,
        fmt.naming,
        fmt.keeps_tied_head,
        torch_dtype(exp.export_dtype),
        _read_for_checks(reader, index, checked),
        storage.display(step_dir),
        FAMILIES.values(),
    )
    if group.lead:
        log.info(
            "%s: step-%d of %s, %s layout %s (%s checkpoint): %d tensors to write as %s/%s, "
            "%d keys left out.",
            exp.name,
            step,
            storage.display(storage.root),
            family.name,
            plan.layout,
            "weights-only" if plan.weights_only else "full training",
            len(plan.tensors),
            fmt.name,
            exp.export_dtype,
            len(plan.dropped),
        )
        for line in plan.left_out():
            log.info("%s: left out: %s", exp.name, line)
        for assumption in plan.assumptions:
            log.warning("%s: %s", exp.name, assumption)
        if storage.remote and conf.workers < _REMOTE_WORKERS:
            log.info(
                "%s: reading an object store with workers=%d: each worker waits a round trip "
                "per window, which small tensors make many; workers=%d or more keeps more "
                "requests in flight (memory stays within batch_mb).",
                exp.name,
                conf.workers,
                _REMOTE_WORKERS,
            )
    assets = fmt.assets(tokenizer_dir, arch)
    return Planned(
        conf, step, index, reader, family, fmt, plan, arch, output, tokenizer_dir, assets, checked
    )


def _read_for_checks(
    reader: TensorReader, index: DcpIndex, checked: dict[str, str]
) -> Callable[[str], torch.Tensor]:
    """Reads a saved tensor whole for a value check, and records its digest in ``checked``:
    the manifest names every tensor whose bytes the output depends on, checks included."""

    def read(key: str) -> torch.Tensor:
        tensor = reader.read_tensor(index.tensors[key])
        checked[key] = xxhash.xxh3_128_hexdigest(tensor.contiguous().view(torch.uint8).numpy())
        return tensor

    return read


def torch_dtype(export: ExportDtype) -> torch.dtype | None:
    return None if export is ExportDtype.keep else getattr(torch, export.value)


def _check_not_source(given: Path, output: Path, index: DcpIndex) -> None:
    """Refuses an output that is, links to, or lies beside the files of the source step."""
    step_dir = Path(index.step_dir).resolve()
    for source in map(Path, index.files):
        if output == source.resolve() or (given.exists() and given.samefile(source)):
            raise ConversionError(
                f"experiment.output {given} is the source file {source} of the checkpoint being "
                "converted; writing it would destroy the checkpoint. Choose another output path."
            )
    if output.is_relative_to(step_dir):
        raise ConversionError(
            f"experiment.output {given} lies inside the source step folder {step_dir}; the "
            "converter never writes into a source checkpoint. Choose another output path."
        )
    if step_dir.is_relative_to(output):
        raise ConversionError(
            f"experiment.output {given} holds the source step folder {step_dir}; replacing "
            "the output would delete the checkpoint. Choose another output path."
        )


def _check_not_folders(output: Path, fmt: OutputFormat) -> None:
    """Refuses, before any work, a folder where a file is to go (or a file where the folder
    output is to go), and a folder that holds a DCP checkpoint anywhere in it (a step folder,
    a run's checkpoint folder): no run replaces one, with overwrite=true or without."""
    if fmt.folder:
        if output.exists() and not output.is_dir():
            raise ConversionError(
                f"experiment.output {output} is a file; output_format={fmt.name} writes a "
                "folder, and the converter never replaces a file with one. Choose a folder "
                "path or remove the file, then run again."
            )
        if output.is_dir() and (saved := _checkpoint_files(output)):
            raise ConversionError(
                f"experiment.output {output} holds a DCP checkpoint ({', '.join(saved)}); "
                "replacing the output would delete it, and the converter never does, with "
                "overwrite=true or without. Choose another output folder."
            )
        return
    if output.is_dir():
        raise ConversionError(
            f"experiment.output {output} is a folder; the output is one file, and the converter "
            f"never replaces a folder. Choose a file path (such as {output / 'model.pt'}) or "
            "remove the folder, then run again."
        )
    for path in (
        manifest_path(output, False),
        *(output.with_name(n) for n in fmt.describe_names(output)),
    ):
        if path.is_dir():
            raise ConversionError(
                f"{path} is a folder, where the converter writes a file that describes "
                f"experiment.output {output}. Remove or rename the folder, or choose another "
                "experiment.output, then run again."
            )


def _check_not_inside_an_output(output: Path) -> None:
    """Refuses an output inside a folder this converter wrote (an ``hf`` output): that folder
    would hold files its manifest does not list, and replacing it would delete them."""
    for folder in output.parents:
        if (manifest := manifest_path(folder, True)).is_file():
            raise ConversionError(
                f"experiment.output {output} lies inside {folder}, an output folder of this "
                f"converter ({manifest.name} is its manifest): it would no longer match its "
                "manifest, and replacing it would delete what is written inside. Choose a "
                "path outside it."
            )


def _checkpoint_files(folder: Path) -> list[str]:
    """The first few DCP index and shard files anywhere under ``folder`` (relative paths)."""
    found: list[str] = []
    for top, _, names in os.walk(folder):
        found += sorted(
            os.path.relpath(os.path.join(top, n), folder)
            for n in names
            if n == METADATA_FILE or n.endswith(".distcp")
        )
        if len(found) > 3:
            return [*found[:3], "..."]
    return found
