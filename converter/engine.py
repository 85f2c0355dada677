"""The streaming conversion: source chunks -> cast tensors -> bytes in place in the output.

Work is split by source tensor and handed to ``workers`` threads (torch's copy and cast kernels
and file I/O release the GIL). A byte budget shared by all workers bounds how much tensor data
is in memory at once: a worker waits for budget before it loads a chunk, so peak memory is
``batch_mb`` (or one chunk, if a chunk is larger) plus a fixed overhead, however large the
checkpoint. FSDP2 shards along dim 0, so a chunk is a run of whole rows and maps to a contiguous
byte range of each output tensor it feeds.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from converter.errors import ConversionError
from converter.mapping import OutputTensor, Plan
from converter.sink import OutputFile
from converter.source import DcpCheckpoint, TensorEntry


@dataclass(frozen=True)
class Region:
    """A byte range written into an output tensor and the CRC-32 of the bytes written."""

    start: int
    length: int
    crc32: int


class ByteBudget:
    """A counting semaphore over bytes; a request larger than the whole budget waits until it
    can run alone."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._cond = threading.Condition()

    def acquire(self, n: int) -> int:
        n = min(n, self.total)
        with self._cond:
            self._cond.wait_for(lambda: self._free >= n)
            self._free -= n
        return n

    def release(self, n: int) -> None:
        with self._cond:
            self._free += n
            self._cond.notify_all()


def convert_tensors(
    checkpoint: DcpCheckpoint,
    plan: Plan,
    out: OutputFile,
    *,
    workers: int,
    budget_bytes: int,
    allow_nonfinite: bool,
    progress: Callable[[int], None],
) -> dict[str, list[Region]]:
    """Fills every output tensor of ``plan`` into ``out``; returns what was written where."""
    consumers: dict[str, list[tuple[OutputTensor, int, int, int]]] = {}
    for tensor in plan.tensors:
        for p in tensor.pieces:
            consumers.setdefault(p.source, []).append((tensor, p.src_start, p.src_stop, p.dst_start))
    regions: dict[str, list[Region]] = {t.name: [] for t in plan.tensors}
    lock = threading.Lock()
    budget = ByteBudget(budget_bytes)
    stop = threading.Event()

    def convert_source(key: str) -> None:
        entry = checkpoint.tensors[key]
        for part in checkpoint.parts(entry):
            if stop.is_set():
                return
            # The loaded chunk plus, at most, its cast copy.
            held = budget.acquire(2 * _rows_bytes(entry, part.stop - part.start))
            try:
                chunk = part.load()
                if not allow_nonfinite and chunk.is_floating_point():
                    _check_finite(chunk, consumers[key][0][0], key, checkpoint)
                for tensor, s0, s1, d0 in consumers[key]:
                    lo, hi = max(part.start, s0), min(part.stop, s1)
                    if lo >= hi:
                        continue
                    data = chunk[lo - part.start : hi - part.start].to(tensor.dtype).contiguous()
                    start = (d0 + lo - s0) * _row_bytes(tensor.shape, tensor.dtype)
                    out.write(tensor.name, start, data)
                    crc = zlib.crc32(data.view(torch.uint8).numpy())
                    with lock:
                        regions[tensor.name].append(Region(start, data.nbytes, crc))
                progress(_rows_bytes(entry, part.stop - part.start))
            finally:
                budget.release(held)

    sources = sorted(consumers, key=lambda k: -checkpoint.tensors[k].nbytes)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert") as pool:
        futures = [pool.submit(convert_source, key) for key in sources]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            stop.set()  # the other workers finish their current chunk and return
            wait(futures)
            raise failed[0].exception()  # type: ignore[misc]
    return regions


def _row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape[1:]:
        n *= s
    return n


def _rows_bytes(entry: TensorEntry, rows: int) -> int:
    return rows * _row_bytes(entry.shape, entry.dtype)


def _check_finite(
    chunk: torch.Tensor, tensor: OutputTensor, key: str, checkpoint: DcpCheckpoint
) -> None:
    """Fails on NaN/Inf in the source, or on values the export dtype cannot hold.

    DCP keeps no checksums, so this is what catches overwritten shard bytes. One ``aminmax``
    pass answers both questions (NaN propagates into it; Inf and overflow show in its ends) at
    several times the speed of ``isfinite``.
    """
    low, high = (float(v) for v in torch.aminmax(chunk))
    limit = torch.finfo(tensor.dtype).max if tensor.dtype.is_floating_point else math.inf
    if math.isfinite(low) and math.isfinite(high) and max(-low, high) <= limit:
        return
    bad = int((~torch.isfinite(chunk)).sum())
    what = f"{bad} NaN/Inf values" if bad else f"values up to {max(-low, high):.3g}, beyond "
    what += "" if bad else f"what {tensor.dtype} holds"
    raise ConversionError(
        f"{key!r} in {checkpoint.step_dir} holds {what} (output {tensor.name!r}). The shard data "
        "is corrupt, training diverged, or the export dtype is too narrow. Convert another "
        "step, choose another experiment.export_dtype, or set allow_nonfinite=true to write "
        "the values anyway."
    )
