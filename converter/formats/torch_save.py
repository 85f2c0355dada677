"""A ``.pt`` output: one ``torch.save`` archive of a flat dict of tensors, as torchtune's
checkpointers read it (``torch.load(path, mmap=True, weights_only=True)``), with a torchtune
recipe snippet beside it. The ``meta`` and ``torchtune`` formats differ in their names only.

``torch.save`` under ``torch.serialization.skip_data`` writes the whole archive (the pickled
structure, one stored, 64-byte-aligned record per tensor) but leaves the records' bytes empty;
the engine then writes each tensor's bytes straight into its record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from converter.formats.base import Described, FormatConfig, OutputFormat, check_loaded
from converter.formats.recipe import torchtune_recipe
from converter.plan import OutputTensor, Plan
from converter.torch_archive import storage_records

TORCHTUNE_SUFFIX = ".torchtune.yaml"


@dataclass
class TorchSaveOptions(FormatConfig):
    output_name: str = field(
        default="final_model.pt",
        metadata={
            "help": "the .pt's name in the checkpoint folder, if experiment.output is not set"
        },
    )


class TorchSaveFormat(OutputFormat):
    folder = False
    checkpointer: ClassVar[str]  # the torchtune checkpointer class that reads it

    def loads_with(self, described: Described) -> str:
        return self.checkpointer

    def check_output(self, output: str) -> None:
        if not output.endswith(".pt"):
            raise ValueError(
                f"experiment.output must be a .pt path for output_format={self.name}, "
                f"got {output!r}"
            )

    def files(self, plan: Plan, options: Any) -> dict[str, list[OutputTensor]]:
        return {"": plan.tensors}

    def create(self, path: Path, tensors: list[OutputTensor]) -> dict[str, int]:
        # torch.empty leaves the pages untouched, so this costs address space, not memory.
        skeleton = {t.name: torch.empty(t.shape, dtype=t.dtype) for t in tensors}
        # Through a Python file object, not a path: torch's own file writer reports a full
        # disk or an exceeded size limit as a bare RuntimeError ("unexpected pos"), Python's
        # as the OSError with its errno. The skipped data is seeked over, not written.
        with open(path, "wb") as f, torch.serialization.skip_data():
            torch.save(skeleton, f)
        return record_offsets(path)

    def read_back(self, path: Path, tensors: list[OutputTensor]) -> dict[str, int]:
        try:
            loaded = torch.load(path, mmap=True, weights_only=True)
        except Exception as e:
            raise ValueError(f"it does not load with torch.load(weights_only=True): {e}") from e
        if not isinstance(loaded, dict) or list(loaded) != [t.name for t in tensors]:
            raise ValueError("its keys differ from the planned ones")
        check_loaded({n: (tuple(t.shape), t.dtype) for n, t in loaded.items()}, tensors)
        try:
            return record_offsets(path, loaded)
        except Exception as e:
            raise ValueError(f"its storage records cannot be read: {e}") from e

    def describe(self, described: Described) -> dict[str, str | Path]:
        [name] = self.describe_names(described.output)
        return {name: self.recipe_snippet(described)}

    def describe_names(self, output: Path) -> list[str]:
        return [output.name + TORCHTUNE_SUFFIX]

    def recipe_snippet(self, d: Described) -> str:
        output = d.output
        return torchtune_recipe(
            d, self.checkpointer, output.parent, [output.name], _torchtune_output_dir(output)
        )

    def missing(self, d: Described) -> list[str]:
        output_dir = _torchtune_output_dir(d.output)
        made = next(p for p in (output_dir, *output_dir.parents) if p.exists())
        if made.is_dir() and os.access(made, os.W_OK | os.X_OK):
            return []
        return [
            f"torchtune cannot create {output_dir}, the checkpointer.output_dir of "
            f"{d.output.name}{TORCHTUNE_SUFFIX} ({made} is not a folder it may write in): give "
            f"it a folder outside {d.output.parent} that it may write, as an override "
            "(tune run ... checkpointer.output_dir=<folder>) or in a copy of the snippet; the "
            "snippet itself is part of the output, which an edit makes not up to date."
        ]


def _torchtune_output_dir(output: Path) -> Path:
    """Where torchtune saves what it trains from ``output``: one folder per output, in a sibling
    of the output's folder (torchtune refuses one inside it), so that two outputs converted into
    one folder do not share it."""
    return output.parent.with_name(f"{output.parent.name}_torchtune") / output.stem


def record_offsets(path: Path, loaded: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Byte offset in the file of each tensor's data, as ``torch.load`` sees the file.

    Loaded with ``mmap=True``, every tensor is a view into one mapping of the file, so its data
    pointer minus the mapping's base is its offset. We pair those with the zip records' offsets
    in file order and check that sizes and spacing agree, rather than trusting record naming.
    No tensor data is touched, so this costs no memory. ``loaded`` is that load, if the caller
    has it already.
    """
    if loaded is None:
        loaded = torch.load(path, mmap=True, weights_only=True)
    with open(path, "rb") as f:
        records = [r for r in storage_records(f) if r[1]]  # empty tensors need no bytes
    storages = sorted(
        (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), name)
        for name, t in loaded.items()
        if t.untyped_storage().nbytes()
    )
    if len(storages) != len(records):
        raise RuntimeError(f"{path}: {len(records)} data records for {len(storages)} tensors")
    base = storages[0][0] - records[0][0] if storages else 0
    offsets = {name: 0 for name in loaded}
    for (ptr, nbytes, name), (offset, size) in zip(storages, records, strict=True):
        if ptr - base != offset or nbytes != size or loaded[name].storage_offset():
            raise RuntimeError(f"{path}: record at byte {offset} does not hold tensor {name!r}")
        offsets[name] = offset
    return offsets
