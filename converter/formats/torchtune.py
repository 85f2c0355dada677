"""``output_format=torchtune``: a ``.pt`` with torchtune's own key names
(``layers.N.attn.q_proj``, ``norm.scale``), which ``FullModelTorchTuneCheckpointer`` loads as
they are."""

from __future__ import annotations

from dataclasses import dataclass

from converter.formats.torch_save import TorchSaveFormat, TorchSaveOptions


@dataclass
class TorchTuneOptions(TorchSaveOptions):
    name: str = "torchtune"


class TorchTuneFormat(TorchSaveFormat):
    name = "torchtune"
    options = TorchTuneOptions
    naming = "torchtune"
    # torchtune's tied model has no output.weight parameter: a strict load refuses one.
    keeps_tied_head = False
    checkpointer = "torchtune.training.FullModelTorchTuneCheckpointer"
