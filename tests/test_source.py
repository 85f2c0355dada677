"""Reading a DCP save: the index as data (a ``.metadata`` that names code is refused, not run),
and a tensor's rows, whatever the layout of the storage DCP saved them in."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

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


@pytest.mark.parametrize(
    "stored",
    [
        torch.arange(48.0).reshape(8, 6),  # contiguous: the rows' bytes alone are read
        torch.arange(48.0).reshape(6, 8).t(),  # a transposed view DCP saves as it is
    ],
    ids=["contiguous", "strided"],
)
def test_rows_of_a_stored_chunk(tmp_path, stored):
    step = tmp_path / "step-1"
    dcp.save({"w": stored}, checkpoint_id=step, no_dist=True)
    checkpoint = DcpCheckpoint(step)
    entry = checkpoint.tensors["w"]
    parts = checkpoint.parts(entry, max_bytes=3 * 6 * 4)  # three rows of float32 at a time
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 8)]
    for part in parts:
        rows = part.load(torch.empty(part.nbytes, dtype=torch.uint8))
        assert torch.equal(rows, stored[part.start : part.stop])
