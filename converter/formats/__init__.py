"""The output formats, by name. A new format is a module here (an ``OutputFormat`` subclass),
its entry below, and ``conf/output_format/<name>.yaml``."""

from __future__ import annotations

from converter.formats.base import OutputFormat
from converter.formats.hf import HfFormat
from converter.formats.meta import MetaFormat
from converter.formats.torchtune import TorchTuneFormat

FORMATS: dict[str, OutputFormat] = {
    f.name: f for f in (MetaFormat(), TorchTuneFormat(), HfFormat())
}
