"""The manifest written with each output: what it was made from, how, and what was left out.

It accounts for every source key (converted or dropped, and why), identifies the bytes the
output came from (a digest of each source tensor as read) and the output's own bytes (a digest
of each file), and carries the fingerprint that lets a re-run with the same source and settings
skip the work. README's "The manifest" says what each field means.
"""

from __future__ import annotations

import json
import math
import platform
from collections import Counter
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from converter.digests import file_digest

MANIFEST_SUFFIX = ".manifest.json"
FOLDER_MANIFEST = "titan2tune.manifest.json"
_PACKAGES = (
    "titan2tune",
    "torch",
    "hydra-core",
    "omegaconf",
    "submitit",
    "safetensors",
    "fsspec",
    "s3fs",  # the object-store backends a remote source is read through
    "gcsfs",
)


def manifest_path(output: Path, folder: bool) -> Path:
    """Beside a one-file output; inside a folder output, published with it."""
    return output / FOLDER_MANIFEST if folder else output.with_name(output.name + MANIFEST_SUFFIX)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path``, or None if it is missing, unreadable, or not of a manifest's
    shape (edited by hand): then the output is not known to be this converter's."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), dict):
        return None
    parts = (manifest.get("source"), manifest.get("config"), manifest["fingerprint"].get("files"))
    if not all(isinstance(part, dict | None) for part in parts):
        return None
    output = manifest.get("output")
    if not isinstance(output, dict):
        return None
    files, sidecars = output.get("files"), output.get("sidecars", {})
    if not isinstance(files, dict) or not isinstance(sidecars, dict):
        return None
    records = [*files.values(), *sidecars.values()]
    return manifest if all(isinstance(r, dict) for r in records) else None


def describes(
    manifest: dict[str, Any] | None,
    output: Path,
    folder: bool,
    staged: Mapping[Path, Path] | None = None,
) -> bool:
    """Whether ``manifest`` was written for the output now at ``output`` (see ``mismatches``)."""
    return not mismatches(manifest, output, folder, staged)


def mismatches(
    manifest: dict[str, Any] | None,
    output: Path,
    folder: bool,
    staged: Mapping[Path, Path] | None = None,
) -> list[str]:
    """How the output now at ``output`` differs from what ``manifest`` records: every file of
    it, and beside it, must have the size and the XXH3-128 digest recorded, and a folder hold
    no other file. ``staged``: sidecars not published yet, final path -> where they are."""
    try:
        files = manifest["output"]["files"] if manifest else None
        if not files:
            return ["it records no files"]
        found = []
        if folder:  # no file added since: torchtitan's reader loads every *.safetensors there
            present = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
            found += [f"{name} was added" for name in sorted(present - {*files, FOLDER_MANIFEST})]
        recorded_at = [(output / name if folder else output, r) for name, r in files.items()]
        sidecars = manifest["output"].get("sidecars", {})  # none recorded before 2026-12-07
        at = {} if staged is None else staged
        recorded_at += [
            (at.get(output.with_name(name), output.with_name(name)), r)
            for name, r in sidecars.items()
        ]
        for path, recorded in recorded_at:
            if not path.is_file():
                found.append(f"{path.name} is gone")
            elif path.stat().st_size != recorded["bytes"] or (
                file_digest(path) != recorded["xxh3_128"]
            ):
                found.append(f"{path.name} changed")
        return found
    except (KeyError, TypeError, OSError) as e:
        return [f"it cannot be read ({e})"]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_manifest(
    *,
    experiment: str,
    source: dict[str, Any],
    plan: Any,
    output: Path,
    output_format: str,
    loads_with: str,
    export_dtype: str,
    files: dict[str, dict[str, Any]],
    sidecars: dict[str, dict[str, Any]],
    missing: list[str],
    durations: dict[str, float],
    config: dict[str, Any],
    fingerprint: dict[str, Any],
    slurm: dict[str, Any] | None,
    nonfinite: dict[str, int],
    underflowed_to_zero: dict[str, int],
) -> dict[str, Any]:
    """``source``: where the data came from (see ``conversion._source_record``); ``files``:
    each output file's size and digests, by its name in the output; ``sidecars``: those of
    the files written beside a one-file output, by their names."""
    return {
        "experiment": experiment,
        "source": source,
        "output": {
            "path": str(output),
            "format": output_format,
            "loads_with": loads_with,
            "dtype": export_dtype,
            "tensors": len(plan.tensors),
            "parameters": sum(math.prod(t.shape) for t in plan.tensors),
            "bytes": sum(f["bytes"] for f in files.values()),
            "files": files,
            "sidecars": sidecars,
            "missing": missing,
        },
        "converted": {t.name: sorted({p.source for p in t.pieces}) for t in plan.tensors},
        "dropped": {d.key: d.reason for d in plan.dropped},
        "dropped_summary": dict(Counter(d.reason for d in plan.dropped)),
        # Settings the checkpoint cannot confirm (head counts): what to check if logits differ.
        "assumptions": plan.assumptions,
        # Values written that are not the source's, per output tensor: NaN/Inf (only with
        # allow_nonfinite=true) and non-zero values that underflowed to zero in the export dtype.
        "nonfinite": nonfinite,
        "underflowed_to_zero": underflowed_to_zero,
        "durations_s": {k: round(v, 3) for k, v in durations.items()},
        "slurm": slurm,
        "config": config,
        "versions": package_versions(),
        "fingerprint": fingerprint,
    }
