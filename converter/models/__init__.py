"""The model families the converter knows, by name. A new family is a module here (a
``ModelFamily`` subclass and its config dataclass), its entry below, and its presets in
``conf/experiment/model/<family>/``."""

from __future__ import annotations

from converter.models.base import ModelConfig, ModelFamily
from converter.models.llama3 import Llama3
from converter.models.qwen3 import Qwen3

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (Llama3(), Qwen3())}


def family_of(config: ModelConfig) -> ModelFamily:
    return FAMILIES[config.family]
