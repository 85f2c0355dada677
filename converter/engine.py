"""The streaming conversion: source chunks -> cast tensors -> bytes in place in the output.

Work is split by source tensor and handed to ``workers`` threads (torch's cast kernels and file
I/O release the GIL). Every run of rows (of at most 32 MiB) is read into, and cast within, a
buffer borrowed from one pool shared by the workers. The pool bounds the memory that tensor data
can take to ``batch_mb`` (or one row, if a row is larger), however large the checkpoint, and it
recycles its buffers:
fresh multi-megabyte allocations would cost a page fault per 4 KiB on every chunk, which was
measured here to take longer than reading the bytes themselves.

FSDP2 shards along dim 0, so a chunk is a run of whole rows and maps to a contiguous byte range
of each output tensor it feeds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
import xxhash

from converter.errors import ConversionError
from converter.mapping import OutputTensor, Plan
from converter.sink import Filler
from converter.source import DcpCheckpoint

_ALIGN = 64
# Reads this large run at the disk's and the page cache's full speed; larger ones only cost memory.
_PART_BYTES = 32 << 20


@dataclass(frozen=True)
class Region:
    """A byte range written into an output tensor and the XXH3-64 digest of its bytes."""

    start: int
    length: int
    digest: int


class BufferPool:
    """Byte buffers whose total size stays within a budget; freed ones are reused.

    A request larger than the whole budget is served alone, once every other buffer is back.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._free: list[torch.Tensor] = []
        self._allocated = 0
        self._in_use = 0
        self._cond = threading.Condition()

    def borrow(self, nbytes: int) -> torch.Tensor:
        with self._cond:
            while True:
                fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
                if fits:
                    # By index: list.remove would compare tensors elementwise.
                    buffer = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
                    break
                if self._allocated + nbytes <= self.budget or not self._in_use:
                    # Drop idle buffers that are too small before growing past the budget.
                    while self._free and self._allocated + nbytes > self.budget:
                        self._allocated -= self._free.pop().numel()
                    buffer = torch.empty(nbytes, dtype=torch.uint8)
                    self._allocated += nbytes
                    break
                if self._free:  # too small, and growing would break the budget
                    self._allocated -= self._free.pop().numel()
                    continue
                self._cond.wait()
            self._in_use += 1
            return buffer

    def give_back(self, buffer: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buffer)
            self._in_use -= 1
            self._cond.notify_all()


def convert_tensors(
    checkpoint: DcpCheckpoint,
    plan: Plan,
    out: Filler,
    *,
    workers: int,
    budget_bytes: int,
    allow_nonfinite: bool,
    progress: Callable[[int], None],
    only: Collection[str] | None = None,
    stopped: Callable[[], bool] = lambda: False,
) -> dict[str, list[Region]]:
    """Fills the output tensors of ``plan`` into ``out`` (from the source tensors ``only``, if
    given: a task's share of a conversion split across tasks); returns what was written where.
    ``stopped`` is asked between parts whether another task has failed the conversion."""
    consumers: dict[str, list[tuple[OutputTensor, int, int, int]]] = {}
    for tensor in plan.tensors:
        for p in tensor.pieces:
            if only is None or p.source in only:
                consumers.setdefault(p.source, []).append(
                    (tensor, p.src_start, p.src_stop, p.dst_start)
                )
    regions: dict[str, list[Region]] = {t.name: [] for t in plan.tensors}
    lock = threading.Lock()
    pool = BufferPool(budget_bytes)
    stop = threading.Event()
    # A part's buffer holds its stored bytes and, cast, up to twice as many (bfloat16 ->
    # float32): parts of a third of each worker's share keep every worker busy in the budget.
    part_bytes = min(_PART_BYTES, budget_bytes // (3 * workers))

    def convert_source(key: str) -> None:
        entry = checkpoint.tensors[key]
        out_dtype = consumers[key][0][0].dtype
        for part in checkpoint.parts(entry, part_bytes):
            if stop.is_set():
                return
            if stopped():
                raise ConversionError("Task 0 stopped the conversion: it failed (see its log).")
            rows = part.stop - part.start
            # Room for the stored blob's tensor storage, then for the cast rows.
            read_bytes = _aligned(part.nbytes)
            buffer = pool.borrow(read_bytes + rows * _row_bytes(entry.shape, out_dtype))
            try:
                chunk = part.load(buffer[:read_bytes])
                if not allow_nonfinite and chunk.is_floating_point():
                    _check_finite(chunk, consumers[key][0][0], key, checkpoint)
                for tensor, s0, s1, d0 in consumers[key]:
                    lo, hi = max(part.start, s0), min(part.stop, s1)
                    if lo >= hi:
                        continue
                    rows_out = chunk[lo - part.start : hi - part.start]
                    data = _cast_into(rows_out, tensor.dtype, buffer[read_bytes:])
                    start = (d0 + lo - s0) * _row_bytes(tensor.shape, tensor.dtype)
                    out.write(tensor.name, start, data)
                    digest = xxhash.xxh3_64_intdigest(data.view(torch.uint8).numpy())
                    with lock:
                        regions[tensor.name].append(Region(start, data.nbytes, digest))
                progress(_row_bytes(entry.shape, entry.dtype) * rows)
            finally:
                pool.give_back(buffer)

    sources = sorted(consumers, key=lambda k: -checkpoint.tensors[k].nbytes)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert") as pool_exec:
        futures = [pool_exec.submit(convert_source, key) for key in sources]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # interrupted (SIGTERM/USR2 -> SystemExit, Ctrl-C): stop soon
            stop.set()
            pool_exec.shutdown(wait=True, cancel_futures=True)
            raise
        failed = [f for f in done if f.exception() is not None]
        if failed:
            stop.set()  # the other workers finish their current chunk and return
            wait(futures)
            raise failed[0].exception()  # type: ignore[misc]
    return regions


def _cast_into(rows: torch.Tensor, dtype: torch.dtype, space: torch.Tensor) -> torch.Tensor:
    """``rows`` cast to ``dtype``, written into ``space`` (no allocation); as is if no cast."""
    if rows.dtype == dtype and rows.is_contiguous():
        return rows
    target = space[: rows.numel() * dtype.itemsize].view(dtype).view(rows.shape)
    return target.copy_(rows)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape[1:]) * dtype.itemsize


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
    what = (
        f"{bad} NaN/Inf values"
        if bad
        else f"values up to {max(-low, high):.3g}, beyond what {tensor.dtype} holds"
    )
    raise ConversionError(
        f"{key!r} in {checkpoint.step_dir} holds {what} (output {tensor.name!r}). The shard data "
        "is corrupt, training diverged, or the export dtype is too narrow. Convert another "
        "step, choose another experiment.export_dtype, or set allow_nonfinite=true to write "
        "the values anyway."
    )
