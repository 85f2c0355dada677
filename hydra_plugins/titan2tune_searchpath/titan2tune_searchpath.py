"""Hydra SearchPathPlugin: makes the repo's launcher profiles (``hydra/launcher=slurm``,
``hydra/launcher=slurm_gpu``) resolvable from any working directory and any Hydra app.

Hydra imports every module under the ``hydra_plugins`` namespace package and calls
``manipulate_search_path`` on each ``SearchPathPlugin`` subclass it finds.

The profiles live in ``<repo>/launch/hydra/launcher/*.yaml``. ``launch`` is not a Python
package (nor installed into site-packages), so ``pkg://launch`` would only resolve when the
repo root happens to be on ``sys.path``. Instead the path is derived from this file's own
location: with an editable install (``pip install -e .``) or when running from a checkout,
this file is ``<repo>/hydra_plugins/titan2tune_searchpath/titan2tune_searchpath.py``, so the
repo root is two directories up. If that directory is absent (a non-editable install ships
no ``launch/``), the plugin adds nothing.

The entry is appended, so an app's own ``hydra/launcher/slurm.yaml`` (primary config dir)
still takes precedence.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "titan2tune"
# <repo>/hydra_plugins/titan2tune_searchpath/<this file> -> <repo>/launch
LAUNCH_DIR = Path(os.path.realpath(__file__)).parents[2] / "launch"


def launch_search_path() -> str | None:
    """The ``file://`` search path entry for the launcher profiles, or None if absent."""
    if (LAUNCH_DIR / "hydra" / "launcher").is_dir():
        # Hydra's file:// source strips the scheme and uses the rest as a plain path
        # (no percent-decoding), so Path.as_uri() would break paths with spaces.
        return f"file://{LAUNCH_DIR}"
    return None


class Titan2tuneSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        path = launch_search_path()
        if path is not None:
            search_path.append(provider=PROVIDER, path=path)
