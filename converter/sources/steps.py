"""Finding the step folder to convert in a torchtitan checkpoint folder.

torchtitan's CheckpointManager saves step ``N`` to ``<dump_folder>/<checkpoint.folder>/step-N/``;
the ``.metadata`` index is the last file a DCP save writes, so a step folder without it is an
unfinished save. Needs no torch (see ``converter.sources.storage``).
"""

from __future__ import annotations

import logging
import re

from converter.errors import ConversionError
from converter.sources.storage import FileInfo, Storage

log = logging.getLogger(__name__)

METADATA_FILE = ".metadata"
SHARD_SUFFIX = ".distcp"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def list_steps(storage: Storage, folder: str) -> dict[int, str]:
    """The ``step-<N>`` folders of a torchtitan checkpoint folder, complete or not."""
    steps: dict[int, str] = {}
    for entry in storage.listdir(folder):
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir:
            n, path = int(m.group(1)), storage.join(folder, entry.name)
            if n in steps:  # step-010 beside step-10: which one was meant is anyone's guess
                raise ConversionError(
                    f"{storage.display(steps[n])} and {storage.display(path)} both name step "
                    f"{n}. torchtitan saves it as step-{n}: rename or move the other folder."
                )
            steps[n] = path
    return dict(sorted(steps.items()))


def _missing(storage: Storage, root: str) -> str:
    """Why the checkpoint folder is not found: for an object store, its bucket may be missing,
    or the endpoint not the store's, and the message names the endpoint asked."""
    shown = storage.display(root)
    what = (
        "Set experiment.checkpoint_dir to the folder that holds the step-<N> folders "
        "(torchtitan's <dump_folder>/<checkpoint.folder>)."
    )
    described = storage.describe()
    if described.get("protocol") not in ("s3", "s3a"):
        return f"Checkpoint folder {shown} does not exist. {what}"
    at = f" at {described['endpoint']}"
    where = (
        "check the endpoint too (storage_options.endpoint_url, AWS_ENDPOINT_URL), and that "
        "these credentials can see it"
    )
    bucket = root.split("/", 1)[0]
    try:
        missing_bucket = bucket != root and storage.info(bucket) is None
    except ConversionError:  # credentials for a prefix alone may not look at the bucket
        missing_bucket = False
    if missing_bucket:
        return (
            f"Bucket {storage.display(bucket)} of experiment.checkpoint_dir {shown} does not "
            f"exist{at}. Check its name; {where}."
        )
    return f"Checkpoint folder {shown} does not exist{at}. {what} Or {where}."


def find_step_dir(storage: Storage, step: int | str) -> tuple[int, str]:
    """Resolves ``step`` (a number or ``latest``) to a step folder with a finished save in the
    checkpoint folder ``storage.root``."""
    root = storage.root
    shown = storage.display(root)
    info = storage.info(root)
    if info is None:
        raise ConversionError(_missing(storage, root))
    if not info.is_dir:
        raise ConversionError(
            f"experiment.checkpoint_dir {shown} is a file, not a folder; point it at "
            "the folder that holds the step-<N> folders."
        )
    steps = list_steps(storage, root)
    if not steps:
        found = [e.name for e in storage.listdir(root)][:10]
        raise ConversionError(
            f"{shown} is not a torchtitan checkpoint folder: it has no step-<N> "
            f"folders (it holds {found or 'nothing'}). {_what_it_is(storage, root)}"
        )

    def complete(n: int) -> bool:
        info = storage.info(storage.join(steps[n], METADATA_FILE))
        return info is not None and not info.is_dir

    if step == "latest":
        # Newest first: a remote store answers one request per step looked at.
        chosen = next((n for n in reversed(steps) if complete(n)), None)
        if chosen is None:
            raise ConversionError(
                f"No finished save in {shown}: none of {[storage.name(p) for p in steps.values()]}"
                f" has a {METADATA_FILE} file (each save was interrupted). Re-run the save."
            )
        unfinished = [n for n in steps if n > chosen]
        if unfinished:
            newest = max(unfinished)
            what = (
                "a Hugging Face save (torchtitan's checkpoint.last_save_in_hf), which needs no "
                "conversion"
                if _is_hf(storage.listdir(steps[newest]))
                else "an unfinished save"
            )
            log.warning(
                "step-%s in %s has no %s (%s); using the newest DCP save, step-%s.",
                newest,
                shown,
                METADATA_FILE,
                what,
                chosen,
            )
        return chosen, steps[chosen]
    assert isinstance(step, int)
    if step not in steps:
        raise ConversionError(
            f"{shown} has no step-{step} folder; the steps saved there are "
            f"{list(steps)}. Set experiment.step to one of them, or to latest."
        )
    if complete(step):
        return step, steps[step]
    finished = [n for n in steps if complete(n)] or "none"
    if _is_hf(storage.listdir(steps[step])):
        raise ConversionError(
            f"{storage.display(steps[step])} holds a Hugging Face safetensors save (torchtitan's "
            "checkpoint.last_save_in_hf), not a DCP save: it needs no conversion. torchtune's "
            "FullModelHFCheckpointer loads it as it is; to convert this run, choose a DCP step "
            f"({finished})."
        )
    raise ConversionError(
        f"{storage.display(steps[step])} has no {METADATA_FILE} file: that save did not "
        f"finish. Choose a complete step ({finished}) or experiment.step=latest."
    )


def _has(listing: list[FileInfo], name: str) -> bool:
    return any(e.name == name and not e.is_dir for e in listing)


def _is_hf(listing: list[FileInfo]) -> bool:
    return any(e.name.endswith(".safetensors") for e in listing)


def _what_it_is(storage: Storage, folder: str) -> str:
    """What a folder without step folders holds instead, and where to point instead."""
    listing = storage.listdir(folder)
    if _has(listing, METADATA_FILE) or any(e.name.endswith(SHARD_SUFFIX) for e in listing):
        return (
            f"It is a step folder itself: set experiment.checkpoint_dir="
            f"{storage.display(storage.parent(folder))} and "
            f"experiment.step={_step_of(storage.name(folder))}."
        )
    if _is_hf(listing):
        return (
            "It holds a Hugging Face checkpoint (safetensors files), which needs no conversion: "
            "torchtune's FullModelHFCheckpointer loads it as it is."
        )
    for entry in listing:
        inner = storage.join(folder, entry.name)
        if entry.is_dir and list_steps(storage, inner):
            return (
                f"It looks like the run's dump folder: its step folders are in "
                f"{storage.display(inner)}; set experiment.checkpoint_dir={storage.display(inner)}."
            )
    return "Point experiment.checkpoint_dir at <dump_folder>/<checkpoint.folder> of the run."


def _step_of(name: str) -> str:
    m = _STEP_DIR.match(name)
    return m.group(1) if m else "latest"
