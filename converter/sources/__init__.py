"""Reading a source checkpoint: where it lies (``storage``), its steps (``steps``), its index
(``dcp``) and any rows of its tensors (``reader``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra.utils import to_absolute_path

from converter.sources.storage import STORAGE_RETRY_S, LocalStorage, Storage, local_part


@contextmanager
def open_storage(
    location: str, options: dict[str, Any] | None = None, retry_s: float = STORAGE_RETRY_S
) -> Iterator[Storage]:
    """The storage of ``experiment.checkpoint_dir``: an fsspec URL (``s3://...``, reached
    with ``experiment.storage_options``, its requests retried for ``retry_s``), or a local
    path (``~`` expanded, relative to where the user ran the command)."""
    storage: Storage
    # A local URL is the local file system: its files are versioned by mtime, and protected
    # from being overwritten by the output, as plain paths are.
    path = local_part(location)
    if path is None:
        from converter.sources.remote import FsspecStorage  # fsspec only for a URL

        storage = FsspecStorage(location, dict(options or {}), retry_s)
    else:
        storage = LocalStorage(to_absolute_path(os.path.expanduser(path)))
    try:
        yield storage
    finally:
        storage.close()
