"""Reading a source checkpoint: where it lies (``storage``), its steps (``steps``), its index
(``dcp``) and any rows of its tensors (``reader``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra.utils import to_absolute_path

from converter.sources.storage import LocalStorage, Storage


@contextmanager
def open_storage(location: str, options: dict[str, Any] | None = None) -> Iterator[Storage]:
    """The storage of ``experiment.checkpoint_dir``: an fsspec URL (``s3://...``, reached
    with ``experiment.storage_options``), or a local path (``~`` expanded, relative to where
    the user ran the command)."""
    storage: Storage
    # fsspec's names for the local file system: its files are versioned by mtime, and
    # protected from being overwritten by the output, as plain paths are.
    local = next((p for p in ("file://", "local://") if location.startswith(p)), None)
    if "://" in location and local is None:
        from converter.sources.remote import FsspecStorage  # fsspec only for a URL

        storage = FsspecStorage(location, dict(options or {}))
    else:
        path = os.path.expanduser(location.removeprefix(local or ""))
        storage = LocalStorage(to_absolute_path(path))
    try:
        yield storage
    finally:
        storage.close()
