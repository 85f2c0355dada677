"""``output_format=meta``: a ``.pt`` with Meta's original key names (``layers.N.attention.wq``,
``output.weight``), which torchtune's ``FullModelMetaCheckpointer`` maps itself."""

from __future__ import annotations

from dataclasses import dataclass

from converter.formats.torch_save import TorchSaveFormat, TorchSaveOptions


@dataclass
class MetaOptions(TorchSaveOptions):
    name: str = "meta"


class MetaFormat(TorchSaveFormat):
    name = "meta"
    options = MetaOptions
    naming = "meta"
    # With model_type LLAMA3_2 the Meta checkpointer pops output.weight itself, and fails with
    # a KeyError if it is absent: a tied model's file keeps a copy of the embeddings there.
    keeps_tied_head = True
    checkpointer = "torchtune.training.FullModelMetaCheckpointer"
