"""What an output format is to the converter.

A format (one module each: ``meta``, ``torchtune``, ``hf``) says:

- which naming of the model family it wants (``ModelFamily.namings``), and whether it keeps
  the head of a model with tied embeddings;
- the files it writes and where each tensor's bytes go in them: it writes each file's structure
  first (a ``torch.save`` archive's records, a safetensors header), so that the engine fills the
  bytes in place, from several threads, in any order;
- the small files that describe the output (a torchtune recipe snippet, a ``config.json``);
- how to read the output back as its consumer does, for verification.

An output is one file (``.pt``), with its describing files beside it, or one folder, with all of
them inside; either is built under a hidden partial name and published by one rename
(``converter.publish``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import MISSING

from converter.models.base import ModelFamily
from converter.plan import OutputTensor, Plan


@dataclass
class FormatConfig:
    """Options of an output format (``conf/output_format/<name>.yaml``)."""

    name: str = MISSING
    output_name: str = field(
        default=MISSING,
        metadata={
            "help": "the output's name in the checkpoint folder, if experiment.output is not set"
        },
    )

    def check(self) -> None:
        """Value checks a type cannot express; raises ValueError."""


def check_loaded(
    loaded: Mapping[str, tuple[tuple[int, ...], torch.dtype]], tensors: list[OutputTensor]
) -> None:
    """Raises ValueError naming the first planned tensor whose dtype or shape differs in the
    output as its consumer loaded it (``loaded``: name -> shape, dtype)."""
    for spec in tensors:
        shape, dtype = loaded[spec.name]
        if shape != spec.shape or dtype != spec.dtype:
            raise ValueError(f"{spec.name!r} is {dtype}{shape}, expected {spec.dtype}{spec.shape}")


@dataclass(frozen=True)
class Described:
    """What the describing files of an output need to know."""

    output: Path  # the final path
    experiment: str
    family: ModelFamily
    arch: Any  # the family's config, with what the shapes determine filled in
    plan: Plan
    options: FormatConfig
    tokenizer_dir: Path | None
    assets: Mapping[str, Path]  # files copied in (name in the output -> file), see assets()


class OutputFormat(ABC):
    """One output format."""

    name: ClassVar[str]
    naming: ClassVar[str]  # the family naming it uses
    keeps_tied_head: ClassVar[bool]
    folder: ClassVar[bool]  # the output is a folder of files, not one file
    options: ClassVar[type[FormatConfig]]
    # The modules that read the files back as their consumers do (imported when needed).
    reads_back_with: ClassVar[tuple[str, ...]] = ()

    def check_output(self, output: str) -> None:  # noqa: B027 (most formats take any path)
        """Refuses an output path this format cannot write (raises ValueError)."""

    @abstractmethod
    def loads_with(self, described: Described) -> str:
        """What loads the output, for the manifest."""

    @abstractmethod
    def files(self, plan: Plan, options: Any) -> dict[str, list[OutputTensor]]:
        """The files of the output (names relative to the folder, or the output's own name
        for a one-file output, ``""``), and the tensors each holds, in order."""

    @abstractmethod
    def create(self, path: Path, tensors: list[OutputTensor]) -> dict[str, int]:
        """Writes the structure of one file at ``path`` (its tensors' bytes left to fill in);
        returns the byte offset in it of each tensor's data."""

    @abstractmethod
    def read_back(self, path: Path, tensors: list[OutputTensor]) -> dict[str, int]:
        """Loads the finished file at ``path`` as its consumer does, checks that it holds
        ``tensors`` (names, order where it matters, shapes, dtypes), and returns where each
        tensor's bytes lie. Raises ValueError with what differs."""

    def assets(self, tokenizer_dir: Path | None, arch: Any) -> dict[str, Path]:
        """The files the output copies in from ``tokenizer_dir`` (name in the output ->
        file), known before any work so that the fingerprint covers them. Raises
        ConversionError if they cannot serve the model ``arch``."""
        return {}

    def reads_from_assets(self, tokenizer_dir: Path | None) -> dict[str, Path]:
        """The files of ``tokenizer_dir`` the output reads without copying them (name ->
        file): the fingerprint covers them too, so that an edit is not up to date."""
        return {}

    def describe(self, described: Described) -> dict[str, str | Path]:
        """The describing files: name -> text, or a file to copy (a tokenizer's). For a
        one-file output they lie beside it, and :meth:`describe_names` names them up front."""
        return {}

    def describe_names(self, output: Path) -> list[str]:
        """The names of the describing files beside a one-file ``output``."""
        return []

    def missing(self, described: Described) -> list[str]:
        """What the output lacks that its consumer may want (tokenizer files), for the
        manifest and the log."""
        return []
