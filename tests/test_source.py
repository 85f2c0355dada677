"""Reading a DCP save: the index as data (a ``.metadata`` that names code is refused, not run),
and any rows of a tensor, whatever the layout of the storage DCP saved them in, and however its
chunks split it (rows, columns, experts)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from converter.errors import ConversionError
from converter.sources.dcp import DcpIndex
from converter.sources.reader import TensorReader
from converter.sources.storage import LocalStorage


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _index(step) -> DcpIndex:
    return DcpIndex(LocalStorage(str(step.parent)), str(step))


def test_a_metadata_pickle_that_names_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    step = tmp_path / "step-1"
    step.mkdir()
    (step / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ConversionError, match=r"not a torch.distributed.checkpoint index .*os"):
        _index(step)
    assert not (tmp_path / "pwned").exists()


def _windows(reader: TensorReader, key: str, rows: int, step: int) -> torch.Tensor:
    entry = reader.index.tensors[key]
    out = []
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        buffer = torch.empty(reader.buffer_bytes(entry, hi - lo), dtype=torch.uint8)
        out.append(reader.read_rows(entry, lo, hi, buffer).clone())
    return torch.cat(out)


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
    reader = TensorReader(_index(step))
    assert torch.equal(_windows(reader, "w", 8, 3), stored)


def test_a_damaged_chunk_archive_is_named(tmp_path):
    """A chunk's archive whose end (the zip directory its layout is read from) was overwritten:
    the error names the chunk, the key and the shard file, as damaged."""
    step = tmp_path / "step-1"
    dcp.save({"w": torch.arange(48.0).reshape(8, 6)}, checkpoint_id=step, no_dist=True)
    index = _index(step)
    [chunk] = index.tensors["w"].chunks
    with open(chunk.file, "r+b") as f:
        f.seek(chunk.offset + chunk.length - 64)
        f.write(bytes(64))
    reader = TensorReader(index)
    with pytest.raises(ConversionError, match=r"Cannot read chunk \(0, 0\) of 'w' from .*distcp"):
        reader.prefetch(["w"])
    with pytest.raises(ConversionError, match="The shard file is damaged"):
        reader.read_tensor(index.tensors["w"])


def _save_chunks(step, full: torch.Tensor, dim: int, parts: int) -> None:
    """One DCP save whose index splits ``full`` along ``dim`` into ``parts`` chunks, as ranks
    of tensor (dim 1) or expert parallelism (dim 0) store it: written by one process, each
    chunk a separate item (DCP's own planner with a hand-made chunk list)."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    step.mkdir(parents=True)
    writer = dcp.FileSystemWriter(step, single_file_per_rank=True, thread_count=1)
    writer.set_up_storage_writer(True)
    chunks, items, data = [], [], {}
    pieces = torch.tensor_split(full, parts, dim=dim)
    for i, piece in enumerate(pieces):
        offsets = [0] * full.dim()
        offsets[dim] = sum(p.shape[dim] for p in pieces[:i])
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=piece.shape)
        chunks.append(chunk)
        index = MetadataIndex("w", torch.Size(offsets))
        items.append(
            WriteItem(
                index=index,
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=chunk, properties=TensorProperties(dtype=full.dtype), size=full.shape
                ),
            )
        )
        data[index] = piece.contiguous()
    plan = writer.prepare_local_plan(SavePlan(items))
    [plan] = writer.prepare_global_plan([plan])

    class _Planner:
        def resolve_data(self, item):
            return data[item.index]

    results = writer.write_data(plan, _Planner()).wait()
    md = Metadata(
        state_dict_metadata={
            "w": TensorStorageMetadata(TensorProperties(dtype=full.dtype), full.shape, chunks)
        }
    )
    writer.finish(md, [results])


@pytest.mark.parametrize(
    "shape, dim",
    [((12, 10), 1), ((4, 6, 5), 1), ((4, 6, 5), 0), ((30,), 0)],
    ids=["columns", "experts_columns", "experts", "vector"],
)
def test_rows_across_chunks(tmp_path, shape, dim):
    """Column chunks (Shard(1)) are read a run at a time into their columns; stacked experts
    sharded on dim 0 or 1 are runs of whole rows: any window reads the same values."""
    full = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    step = tmp_path / "step-1"
    _save_chunks(step, full, dim, 3)
    reader = TensorReader(_index(step))
    entry = reader.index.tensors["w"]
    assert len(entry.chunks) == 3
    rows = entry.rows[0]
    for window in (1, 2, 5, rows):
        assert torch.equal(_windows(reader, "w", rows, window), full.reshape(rows, -1)), window


@pytest.mark.parametrize(
    "damage, fault",
    [
        (lambda chunks: chunks[:1] + chunks[2:], "leave part of it uncovered"),
        (lambda chunks: chunks + chunks[1:2], "overlap"),
        (lambda chunks: [*chunks[:-1], _grown(chunks[-1], 1)], "beyond the shape"),
    ],
    ids=["chunk_missing", "chunk_twice", "chunk_out_of_bounds"],
)
def test_an_index_whose_chunks_do_not_tile_a_tensor_is_refused(tmp_path, damage, fault):
    """A real three-chunk save whose ``.metadata`` lists a chunk too few, one twice, or one
    past the tensor's end: read as listed, rows would be left as the buffer held them (a wrong
    output that verifies), so the index is refused, naming the tensor."""
    step = tmp_path / "step-1"
    _save_chunks(step, torch.arange(60.0).reshape(12, 5), 0, 3)
    TensorReader(_index(step))  # as saved, it reads
    metadata = pickle.loads((step / ".metadata").read_bytes())
    md = metadata.state_dict_metadata["w"]
    md.chunks = damage(list(md.chunks))
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ConversionError, match=rf"'w' \(shape \[12, 5\]\) .*{fault}") as raised:
        _index(step)
    assert str(step / ".metadata") in str(raised.value)


def _grown(chunk, rows: int):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    sizes = torch.Size([chunk.sizes[0] + rows, *chunk.sizes[1:]])
    return ChunkStorageMetadata(offsets=chunk.offsets, sizes=sizes)


@pytest.mark.parametrize(
    "boxes, fault",
    [
        ([((0, 0), (2, 3)), ((0, 3), (2, 3)), ((2, 0), (2, 6))], None),  # TP inside FSDP
        ([((0, 0), (2, 3)), ((2, 0), (2, 6))], "leave part of it uncovered"),
        ([((0, 0), (2, 4)), ((0, 3), (2, 3)), ((2, 0), (2, 6))], "overlap"),
        ([((0, 0), (4, 6)), ((4, 0), (0, 6))], None),  # a rank with no rows (uneven FSDP)
        ([((2, 0), (2, 6)), ((4, 0), (0, 6))], "leave part of it uncovered"),
        ([((0, 0), (3, 6)), ((2, 0), (2, 6))], "overlap"),
        ([((0, 0), (4, 6)), ((0, 0), (4, 6))], "overlap"),
    ],
    ids=[
        "grid",
        "grid_gap",
        "grid_overlap",
        "empty_chunk",
        "rows_gap",
        "rows_overlap",
        "twice_whole",
    ],
)
def test_chunk_tilings(boxes, fault):
    """Chunks split along two dimensions (tensor inside data parallelism) are checked on the
    grid their boundaries make; along one, as ranges; an empty chunk covers nothing."""
    from converter.sources.dcp import Chunk, TensorEntry, _tiling_fault

    chunks = tuple(Chunk(offsets, sizes, "__0_0.distcp", 0, 0) for offsets, sizes in boxes)
    assert _tiling_fault(TensorEntry("w", torch.float32, (4, 6), chunks)) == fault
