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
    """The storage of ``experiment.checkpoint_dir``: a local path (``~`` expanded, relative
    to where the user ran the command)."""
    storage: Storage = LocalStorage(to_absolute_path(os.path.expanduser(location)))
    try:
        yield storage
    finally:
        storage.close()
