"""The torchtune recipe sections written with an output: its ``checkpointer:`` and ``model:``,
to paste into a recipe config or to instantiate with ``torchtune.config.instantiate``."""

from __future__ import annotations

from pathlib import Path

import yaml

from converter.formats.base import Described


def torchtune_recipe(
    d: Described, checkpointer: str, checkpoint_dir: Path, files: list[str], output_dir: Path
) -> str:
    """The sections for torchtune's ``checkpointer`` class reading ``files`` of
    ``checkpoint_dir``. ``output_dir``, where torchtune writes its own saves, must lie outside
    ``checkpoint_dir`` (torchtune's check_outdir_not_in_ckptdir refuses it)."""
    section = {
        "_component_": checkpointer,
        "checkpoint_dir": str(checkpoint_dir),
        "checkpoint_files": files,
        "output_dir": str(output_dir),
        "model_type": d.family.torchtune_model_type(d.arch),
    }
    model = d.family.torchtune_model(d.arch)
    doc = {"checkpointer": section, **({"model": model} if model else {})}
    header = (
        f"# torchtune recipe sections for {d.output.name} (experiment {d.experiment}),\n"
        "# written by titan2tune. Paste them into a recipe config, or instantiate them with\n"
        "# torchtune.config.instantiate. output_dir is where torchtune writes its own saves.\n"
    )
    if not model:
        header += (
            "# No model: section: torchtune has no builder of this model (the conversion's\n"
            "# log and the manifest's assumptions say why).\n"
        )
    return header + yaml.safe_dump(doc, sort_keys=False)
