"""Whether an output on disk is this very conversion, so that a run may skip it.

A conversion is identified by its fingerprint (the source files as listed, the settings, the
converter's version and code, the files it takes from the tokenizer folder) and checked against
the output's files as its manifest records them. An output that holds another conversion is
refused, saying what differs, unless ``overwrite=true``; one that another converter made from
the same source and settings is converted again.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import xxhash

from converter.config import ConvertConfig, to_plain
from converter.digests import file_digest
from converter.errors import ConversionError, n_tensors
from converter.manifest import manifest_path, mismatches, package_versions, read_manifest
from converter.planned import Planned
from converter.sources.storage import LocalStorage, local_part

log = logging.getLogger("titan2tune")


_CODE = "converter_code_xxh3_128"


@functools.cache
def code_digest() -> str:
    """The XXH3-128 of this package's Python files, by their paths within it: what a fix to
    the output changes, where the version (bumped by hand, if ever) need not."""
    package = Path(__file__).resolve().parent
    digest = xxhash.xxh3_128()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _by_source_and_settings(print_: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint without the converter that wrote it."""
    return {k: v for k, v in print_.items() if k not in ("converter", _CODE)}


def fingerprint(planned: Planned) -> dict[str, Any]:
    """Identifies a conversion: the same fingerprint means the same output bytes.

    Every file the output is read from is identified by its size and its version as the
    storage lists it (a local file's modification time in ns, an object's ETag), taken before
    its tensors are read: a file rewritten in place, even to the same size, has a new one, so
    the next run converts again. That costs one listing, whatever the checkpoint's size; the
    small ``.metadata``, read anyway, is also hashed."""
    index, conf = planned.index, planned.conf
    read = planned.fmt.reads_from_assets(planned.tokenizer_dir)
    assets = {**planned.assets, **{f"{n}{_READ_NOT_COPIED}": p for n, p in read.items()}}
    return {
        # A local folder by its real path: reached through a symbolic link, it is the same.
        "step_dir": (
            os.path.realpath(index.step_dir)
            if isinstance(index.storage, LocalStorage)
            else index.storage.display(index.step_dir)
        ),
        "metadata_xxh3_128": xxhash.xxh3_128_hexdigest(index.metadata_bytes),
        "files": {
            index.storage.name(path): {"bytes": info.size, index.storage.version_kind: info.version}
            for path, info in index.files.items()
        },
        "output_format": to_plain(conf.output_format),
        "export_dtype": str(conf.experiment.export_dtype),
        "model": to_plain(conf.experiment.model),
        # The converter by its version and its code: an output written before a fix to the code
        # that writes it is not up to date, whatever the version says.
        "converter": package_versions()["titan2tune"],
        _CODE: code_digest(),
        # The files copied in (tokenizer), and those read but not copied (the token ids of an
        # hf folder's config.json), by content: only for a format that reads any.
        **({"assets": {n: file_digest(p) for n, p in assets.items()}} if assets else {}),
    }


def already_done(planned: Planned, print_: dict[str, Any]) -> bool:
    """True if the output holds this very conversion (and ``force`` is off); raises if it
    holds another and may not be replaced, saying what differs. One written by another
    converter (another version or code) from the same source and settings, and untouched, is
    converted again: it may hold what a fix has changed since."""
    output, conf, folder = planned.output, planned.conf, planned.fmt.folder
    if not output.exists() or (folder and output.is_dir() and not any(output.iterdir())):
        return False  # nothing there, or an empty folder: nothing to lose
    previous = read_manifest(manifest_path(output, folder))
    recorded = _comparable(previous.get("fingerprint"), print_) if previous else None
    same_source_and_settings = (
        recorded is not None
        and _by_source_and_settings(recorded) == _by_source_and_settings(print_)
        and _written_here(previous, output)
    )
    # A file the store lists no version of could have changed unseen: never up to date.
    unversioned = sorted(name for name, seen in print_["files"].items() if "" in seen.values())
    if same_source_and_settings and unversioned:
        log.info(
            "%s: converting %s again: the store lists no version (ETag, modification time) of %s, "
            "so a changed source could not be told from this one.",
            planned.name,
            output,
            ", ".join(unversioned[:3]) + (" and more" if len(unversioned) > 3 else ""),
        )
        return False
    # The files themselves are checked too: an old manifest beside replaced bytes does not
    # count. Hashed once: the refusal below names what differs from the same pass.
    differ = mismatches(previous, output, folder) if same_source_and_settings else None
    if same_source_and_settings and not differ:
        # First: whatever this run allows, that converter's output is not this one's.
        if recorded != print_:
            log.info(
                "%s: converting %s again: it was written by another titan2tune (%s), whose "
                "output may differ from this one's.",
                planned.name,
                output,
                _converter(recorded),
            )
            return False
        if previous.get("nonfinite") and not conf.allow_nonfinite:
            if conf.overwrite:
                log.info(
                    "%s: replacing %s (overwrite=true): it holds NaN/Inf values.",
                    planned.name,
                    output,
                )
                return False
            raise ConversionError(
                f"Output {output} holds NaN/Inf values in {n_tensors(len(previous['nonfinite']))}, "
                "written with allow_nonfinite=true (its manifest's nonfinite lists them), and "
                "this run does not allow them. Set allow_nonfinite=true to keep it as it is, "
                "or overwrite=true to convert again (which fails on those values)."
            )
        if conf.force:
            log.info(
                "%s: converting %s again (force=true), though it is up to date.",
                planned.name,
                output,
            )
            return False
        if asked := _not_given(previous, conf):
            log.info(
                "%s: converting %s again: this run asks for %s.",
                planned.name,
                output,
                " and ".join(asked),
            )
            return False
        return True
    if conf.overwrite:  # force=true only converts an up-to-date output again
        log.info("%s: replacing %s (overwrite=true).", planned.name, output)
        return False
    if previous is None:
        why = (
            "with no manifest of ours (not written by this converter, or its manifest is gone, "
            "unreadable or edited)"
        )
    else:
        if differ is None:
            differ = mismatches(previous, output, folder)
        why = "but " + "; ".join(_differences(previous, print_, output, folder, differ))
    raise ConversionError(
        f"Output {output} already exists, {why}. Set overwrite=true to replace it, or choose "
        "another experiment.output."
    )


def _written_here(previous: dict[str, Any], output: Path) -> bool:
    """Whether the output on disk was written where it is: its recipe snippet names its own
    folder, so a moved or copied output would send torchtune to the old place."""
    written = str((previous.get("output") or {}).get("path", output))
    return os.path.realpath(written) == os.path.realpath(output)


_READ_NOT_COPIED = " (read, not copied)"


def _comparable(recorded: Any, now: dict[str, Any]) -> dict[str, Any] | None:
    """A recorded fingerprint as ``fingerprint`` makes one now (``now``). Before 2026-12-07 a
    local step folder was recorded as given (through any symbolic link), not by its real path,
    and the files read from the tokenizer folder but not copied were not recorded: those are
    taken as they are now, as that version did."""
    if not isinstance(recorded, dict):
        return None
    if (path := local_part(str(recorded.get("step_dir")))) is not None:
        recorded = {**recorded, "step_dir": os.path.realpath(path)}
    old = recorded.get("assets")
    if isinstance(old, dict) and not any(k.endswith(_READ_NOT_COPIED) for k in old):
        read = {k: v for k, v in now.get("assets", {}).items() if k.endswith(_READ_NOT_COPIED)}
        recorded = {**recorded, "assets": {**old, **read}}
    return recorded


def _not_given(previous: dict[str, Any], conf: ConvertConfig) -> list[str]:
    """What this run asks of its output that the same conversion on disk was not given."""
    was = previous.get("config") or {}
    asked = []
    if conf.verify and not was.get("verify"):
        asked.append("verify=true (it was written with verify=false, and never read back)")
    recorded = [
        *previous["output"]["files"].values(),
        *previous["output"].get("sidecars", {}).values(),
    ]
    if conf.sha256 and not all("sha256" in f for f in recorded):
        asked.append("sha256=true (its manifest records no sha256)")
    return asked


def _differences(
    previous: dict[str, Any], print_: dict[str, Any], output: Path, folder: bool, differ: list[str]
) -> list[str]:
    """What makes the conversion on disk another than this one, in a user's words (``differ``:
    how its files differ from its manifest, see ``mismatches``)."""
    old = _comparable(previous.get("fingerprint"), print_) or {}
    found = []
    if old.get("step_dir") != print_["step_dir"]:
        was = (previous.get("source") or {}).get("step_dir") or old.get("step_dir")
        found.append(f"it was converted from {was}, this run reads {print_['step_dir']}")
    for key in ("output_format", "export_dtype", "model"):
        for field, (was, now) in _changed_fields(key, old.get(key), print_[key]).items():
            found.append(f"its {field} was {was}, this run's is {now}")
    was, now = old.get("assets") or {}, print_.get("assets") or {}
    if was != now:
        changed = sorted(n for n in {*was, *now} if was.get(n) != now.get(n))
        found.append(
            f"the files it took from the tokenizer folder differ now ({', '.join(changed)}; "
            "experiment.tokenizer_dir)"
        )
    if old.get("step_dir") == print_["step_dir"]:
        changed = sorted(
            name for name, seen in print_["files"].items() if old.get("files", {}).get(name) != seen
        )
        changed += sorted(set(old.get("files", {})) - set(print_["files"]))
        if changed or old.get("metadata_xxh3_128") != print_["metadata_xxh3_128"]:
            what = ", ".join(changed) or ".metadata"
            found.append(f"the source files changed since it was converted ({what})")
    if not _written_here(previous, output):
        found.append(
            f"it was written at {previous['output']['path']} and moved or copied here, where "
            "its recipe snippet (checkpoint_dir) still names the old place"
        )
    if _converter(old) != _converter(print_):
        found.append(f"it was written by another titan2tune ({_converter(old)})")
    if differ:
        found.append(
            f"its files no longer match its manifest {manifest_path(output, folder)} "
            f"({', '.join(differ)})"
        )
    return found or ["it was written with other settings"]


def _converter(print_: dict[str, Any]) -> str:
    """The converter that a fingerprint names, in a user's words."""
    code = print_.get(_CODE)
    return f"version {print_.get('converter')}, " + (
        f"code {code[:12]}" if isinstance(code, str) else "code not recorded"
    )


def _changed_fields(name: str, old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """The dotted fields of two settings (nested dicts) that differ: name -> (old, new)."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed = {}
        for key in [*old, *(k for k in new if k not in old)]:
            changed |= _changed_fields(f"{name}.{key}", old.get(key), new.get(key))
        return changed
    return {} if old == new else {name: (old, new)}
