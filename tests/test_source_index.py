"""The DCP index is read as data: a ``.metadata`` that names code is refused, not run."""

from __future__ import annotations

import os
import pickle

import pytest

from converter.errors import ConversionError
from converter.source import DcpCheckpoint


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_metadata_pickle_that_names_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    step = tmp_path / "step-1"
    step.mkdir()
    (step / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ConversionError, match=r"not a torch.distributed.checkpoint index .*os"):
        DcpCheckpoint(step)
    assert not (tmp_path / "pwned").exists()
