"""Finding the step folder to convert in a torchtitan checkpoint folder.

Needs no torch: the job resolves the folder and starts hashing its files before it imports
torch, so that the hashing runs on another core during that import (3-4 s here).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from converter.errors import ConversionError

log = logging.getLogger(__name__)

METADATA_FILE = ".metadata"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_steps(checkpoint_dir: Path) -> dict[int, Path]:
    """The ``step-<N>`` folders of a torchtitan checkpoint folder, complete or not."""
    steps = {}
    for child in checkpoint_dir.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            steps[int(m.group(1))] = child
    return dict(sorted(steps.items()))


def find_step_dir(checkpoint_dir: Path, step: int | str) -> tuple[int, Path]:
    """Resolves ``step`` (a number or ``latest``) to a step folder with a finished save."""
    if not checkpoint_dir.exists():
        raise ConversionError(
            f"Checkpoint folder {checkpoint_dir} does not exist. Set experiment.checkpoint_dir "
            "to the folder that holds the step-<N> folders (torchtitan's "
            "<dump_folder>/<checkpoint.folder>)."
        )
    if not checkpoint_dir.is_dir():
        raise ConversionError(
            f"experiment.checkpoint_dir {checkpoint_dir} is a file, not a folder; point it at "
            "the folder that holds the step-<N> folders."
        )
    steps = list_steps(checkpoint_dir)
    if not steps:
        found = sorted(p.name for p in checkpoint_dir.iterdir())[:10]
        raise ConversionError(
            f"{checkpoint_dir} is not a torchtitan checkpoint folder: it has no step-<N> "
            f"folders (it holds {found or 'nothing'}). {_what_it_is(checkpoint_dir)}"
        )
    complete = {n: p for n, p in steps.items() if (p / METADATA_FILE).is_file()}
    if step == "latest":
        if not complete:
            raise ConversionError(
                f"No finished save in {checkpoint_dir}: none of {[p.name for p in steps.values()]}"
                f" has a {METADATA_FILE} file (each save was interrupted). Re-run the save."
            )
        chosen = max(complete)
        unfinished = [n for n in steps if n > chosen]
        if unfinished:
            log.warning(
                "step-%s in %s has no %s (an unfinished save); using the newest complete "
                "save, step-%s.",
                max(unfinished),
                checkpoint_dir,
                METADATA_FILE,
                chosen,
            )
        return chosen, complete[chosen]
    assert isinstance(step, int)
    if step not in steps:
        raise ConversionError(
            f"{checkpoint_dir} has no step-{step} folder; the steps saved there are "
            f"{list(steps)}. Set experiment.step to one of them, or to latest."
        )
    if step not in complete and _is_hf(steps[step]):
        raise ConversionError(
            f"{steps[step]} holds a Hugging Face safetensors save (torchtitan's "
            "checkpoint.last_save_in_hf), not a DCP save: it needs no conversion. torchtune's "
            "FullModelHFCheckpointer loads it as it is; to convert this run, choose a DCP step "
            f"({list(complete) or 'none'})."
        )
    if step not in complete:
        raise ConversionError(
            f"{steps[step]} has no {METADATA_FILE} file: that save did not finish. Choose a "
            f"complete step ({list(complete) or 'none'}) or experiment.step=latest."
        )
    return step, steps[step]


def _is_hf(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _what_it_is(folder: Path) -> str:
    """What a folder without step folders holds instead, and where to point instead."""
    if (folder / METADATA_FILE).is_file() or any(folder.glob("*.distcp")):
        return (
            f"It is a step folder itself: set experiment.checkpoint_dir={folder.parent} and "
            f"experiment.step={_step_of(folder.name)}."
        )
    if _is_hf(folder):
        return (
            "It holds a Hugging Face checkpoint (safetensors files), which needs no conversion: "
            "torchtune's FullModelHFCheckpointer loads it as it is."
        )
    inner = sorted(p for p in folder.iterdir() if p.is_dir() and list_steps(p))
    if inner:
        return (
            f"It looks like the run's dump folder: its step folders are in {inner[0]}; set "
            f"experiment.checkpoint_dir={inner[0]}."
        )
    return "Point experiment.checkpoint_dir at <dump_folder>/<checkpoint.folder> of the run."


def _step_of(name: str) -> str:
    m = _STEP_DIR.match(name)
    return m.group(1) if m else "latest"


def step_files(step_dir: Path) -> list[Path]:
    """The files of a DCP save: its index and the shard files DCP's writer names
    ``__<rank>_<n>.distcp``. (The index names the shards; this list serves before it is read.)"""
    return [step_dir / METADATA_FILE, *sorted(step_dir.glob("*.distcp"))]
