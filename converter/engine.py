"""The streaming conversion: windows of source rows -> cast, reordered rows -> bytes in place.

Work is split by source tensor and handed to ``workers`` threads (torch's cast kernels and file
I/O release the GIL). Every window of rows (of at most 32 MiB) is read into, and cast within, a
buffer borrowed from one pool shared by the workers. The pool bounds the memory that tensor data
can take to ``batch_mb`` (or one row, if a row is larger), however large the checkpoint, and it
recycles its buffers: fresh multi-megabyte allocations would cost a page fault per 4 KiB on
every window, which was measured to take longer than reading the bytes themselves.

The plan says where each run of source rows lands in the output (``converter.plan``): a window
of source rows maps to a contiguous byte range of each output tensor it feeds, reordered within
the blocks (attention heads) a piece names. The engine names no key.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import xxhash

from converter.errors import ConversionError
from converter.filler import Filler, Region
from converter.plan import OutputTensor, Piece, Plan, row_shape
from converter.sources.dcp import TensorEntry
from converter.sources.reader import TensorReader

_ALIGN = 64
# Reads this large window at the disk's and the page cache's full speed; larger ones only cost
# memory.
_WINDOW_BYTES = 32 << 20


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


@dataclass(frozen=True)
class Filled:
    """What a conversion wrote: the regions of each output tensor, and the XXH3-128 digest of
    each source tensor's bytes as read (row-major, as saved), which names any tensor whose
    bytes change later; and, per output tensor, the values written that are not the source's
    (see ``_altered``): NaN/Inf (with ``allow_nonfinite``) and values that underflowed to zero."""

    regions: dict[str, list[Region]]
    source_digests: dict[str, str]
    nonfinite: dict[str, int] = field(default_factory=dict)
    underflowed_to_zero: dict[str, int] = field(default_factory=dict)


def convert_tensors(
    reader: TensorReader,
    plan: Plan,
    out: Filler,
    *,
    workers: int,
    budget_bytes: int,
    allow_nonfinite: bool,
    progress: Callable[[int], None],
    only: Collection[str] | None = None,
    stopped: Callable[[], bool] = lambda: False,
) -> Filled:
    """Fills the output tensors of ``plan`` into ``out`` (from the source tensors ``only``, if
    given: a task's share of a conversion split across tasks). ``stopped`` is asked between
    windows whether another task has failed the conversion."""
    consumers: dict[str, list[tuple[OutputTensor, Piece]]] = {}
    for tensor in plan.tensors:
        for p in tensor.pieces:
            if only is None or p.source in only:
                consumers.setdefault(p.source, []).append((tensor, p))
    regions: dict[str, list[Region]] = {t.name: [] for t in plan.tensors}
    digests: dict[str, str] = {}
    nonfinite: Counter[str] = Counter()
    underflowed: Counter[str] = Counter()
    lock = threading.Lock()
    pool = BufferPool(budget_bytes)
    stop = threading.Event()
    # A window's buffer holds its stored bytes and, cast, up to twice as many (bfloat16 ->
    # float32, or float16 from bfloat16 with the underflow count's scratch): windows of a third
    # of each worker's share keep every worker busy in the budget.
    window_bytes = min(_WINDOW_BYTES, budget_bytes // (3 * workers))
    index = reader.index
    step_dir = index.storage.display(index.step_dir)

    def convert_source(key: str) -> None:
        entry = index.tensors[key]
        uses = consumers[key]
        out_dtype = uses[0][0].dtype
        counting = _may_underflow(entry.dtype, out_dtype)
        digest = xxhash.xxh3_128()
        cuts = {run.row for run in reader.runs(entry)}
        for start, stop_row in _windows(entry, cuts, uses, window_bytes):
            if stop.is_set():
                return
            if stopped():
                raise ConversionError("Task 0 stopped the conversion: it failed (see its log).")
            rows = stop_row - start
            # Room for the stored rows (and a staging copy of column-sharded chunks), then
            # for the cast rows, and as much again for counting underflows (see _altered).
            read_bytes = _aligned(reader.buffer_bytes(entry, rows))
            cast_bytes = rows * _row_bytes(entry.shape, out_dtype)
            buffer = pool.borrow(read_bytes + cast_bytes * (2 if counting else 1))
            scratch = buffer[read_bytes + cast_bytes :]
            try:
                window = reader.read_rows(entry, start, stop_row, buffer[:read_bytes])
                digest.update(window.view(torch.uint8).numpy())
                for tensor, p in uses:
                    lo, hi = max(start, p.src_start), min(stop_row, p.src_stop)
                    if lo >= hi:
                        continue
                    source_rows = window[lo - start : hi - start]
                    row_bytes = _row_bytes(tensor.shape, tensor.dtype)
                    offset = (p.dst_start + lo - p.src_start) * row_bytes
                    data = _cast_into(source_rows, tensor.dtype, buffer[read_bytes:], p)
                    bad, zeroed = _altered(data, source_rows, scratch if counting else None)
                    if bad and not allow_nonfinite:
                        raise _nonfinite_error(bad, source_rows, tensor, key, step_dir)
                    region = out.write(tensor.name, offset, data)
                    with lock:
                        regions[tensor.name].append(region)
                        nonfinite[tensor.name] += bad
                        underflowed[tensor.name] += zeroed
                progress(rows * entry.row_bytes)
            finally:
                pool.give_back(buffer)
        with lock:
            digests[key] = digest.hexdigest()

    # In the order of the files' bytes: the read-back follows the writes through each file in
    # order (converter.verify), and reads what was just written while it is in memory.
    sources = sorted(consumers, key=lambda k: min(out.position(t.name) for t, _ in consumers[k]))
    # Every chunk's layout up front, in batches: a remote store answers those small reads
    # side by side instead of one round trip per chunk as the workers reach it.
    reader.prefetch(sources)
    with (
        threads_per_worker(workers),
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="convert") as pool_exec,
    ):
        futures = [pool_exec.submit(convert_source, key) for key in sources]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # interrupted (SIGTERM/USR2 -> SystemExit, Ctrl-C): stop soon
            stop.set()
            index.storage.abort()  # a read retrying against a store that does not answer
            pool_exec.shutdown(wait=True, cancel_futures=True)
            raise
        failed = [f for f in done if f.exception() is not None]
        if failed:
            stop.set()  # the other workers finish their current window and return
            index.storage.abort()
            wait(futures)
            raise failed[0].exception()  # type: ignore[misc]
    return Filled(regions, digests, dict(+nonfinite), dict(+underflowed))


@contextmanager
def threads_per_worker(workers: int) -> Iterator[None]:
    """torch's intra-op threads shared out among ``workers`` while they run: each worker's casts
    and reductions would otherwise start an OpenMP team of as many threads as the machine has
    cores, and ``workers`` such teams oversubscribe them. A thread takes torch's count when it
    first runs a parallel kernel, so the workers' pool must be made inside; one conversion
    runs at a time in a process (a job's tasks are processes of their own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _windows(
    entry: TensorEntry, cuts: set[int], uses: list[tuple[OutputTensor, Piece]], max_bytes: int
) -> list[tuple[int, int]]:
    """The tensor as windows of whole rows in order, of at most ``max_bytes`` (but for single
    rows, or blocks, larger than that), so that one 128k-vocabulary embedding does not need its
    1 GB in memory at once; each a whole number of the blocks its reorderings work on, and
    within one stored chunk wherever the chunks' boundaries (``cuts``) allow, so that a window
    is one read (or one mapping) of one file."""
    rows = entry.rows[0]
    block = math.lcm(1, *(p.reorder.block for _, p in uses if p.reorder))
    step = max(1, max_bytes // max(entry.row_bytes, 1)) // block * block or block
    windows, lo = [], 0
    for cut in sorted({c for c in cuts if c % block == 0 and 0 < c < rows} | {rows}):
        while lo < cut:
            windows.append((lo, min(lo + step, cut)))
            lo = windows[-1][1]
    return windows


def _cast_into(
    rows: torch.Tensor, dtype: torch.dtype, space: torch.Tensor, piece: Piece
) -> torch.Tensor:
    """``rows`` cast to ``dtype`` and reordered as ``piece`` says, written into ``space`` (no
    allocation); ``rows`` as they are if neither is needed."""
    if rows.dtype == dtype and rows.is_contiguous() and piece.reorder is None:
        return rows
    target = space[: rows.numel() * dtype.itemsize].view(dtype).view(rows.shape)
    if piece.reorder is None:
        return target.copy_(rows)
    piece.reorder.order.copy(rows, piece.reorder.block, target)
    return target


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return row_shape(shape)[1] * dtype.itemsize


def _may_underflow(stored: torch.dtype, export: torch.dtype) -> bool:
    """Whether a cast can turn non-zero values into zero: to a dtype of a narrower exponent
    range (float16, from bfloat16 or float32). bfloat16 keeps float32's, the same smallest
    normal (1.2e-38): only float32 values below half its smallest subnormal (4.6e-41) would
    underflow, and counting them would take a pass over every source byte of the most common
    export, so that cast is not counted."""
    return (
        stored.is_floating_point
        and export.is_floating_point
        and torch.finfo(export).tiny > torch.finfo(stored).tiny
    )


def _altered(
    data: torch.Tensor, rows: torch.Tensor, scratch: torch.Tensor | None
) -> tuple[int, int]:
    """How many of the values written (``data``, cast from ``rows``) are NaN/Inf and, given
    ``scratch`` (room for ``data``'s bytes, see ``_may_underflow``), how many non-zero source
    values underflowed to zero.

    DCP keeps no checksums, so the first count is what catches overwritten shard bytes. One
    ``aminmax`` pass answers whether there are any (NaN propagates into it; Inf shows in its
    ends) at several times the speed of ``isfinite``, on the written rows: half the bytes of
    float32 ones for a bfloat16 export; they are counted only if there are.
    """
    if not data.is_floating_point() or not data.numel():
        return 0, 0
    low, high = (float(v) for v in torch.aminmax(data))
    bad = 0 if math.isfinite(low) and math.isfinite(high) else int((~torch.isfinite(data)).sum())
    if scratch is None:
        return bad, 0
    return bad, _nonzero(rows, scratch) - _nonzero(data, scratch)


def _nonzero(values: torch.Tensor, scratch: torch.Tensor) -> int:
    """The non-zero values (neither +0 nor -0) of a floating tensor. 16-bit ones are counted
    by their magnitude bits, in ``scratch``: torch counts them as floats several times slower
    than it casts them."""
    if values.element_size() != 2:
        return int(torch.count_nonzero(values))
    bits = values.view(torch.int16)
    magnitude = scratch[: values.nbytes].view(torch.int16).view(bits.shape)
    return int(torch.count_nonzero(torch.bitwise_and(bits, 0x7FFF, out=magnitude)))


def _nonfinite_error(
    bad: int, rows: torch.Tensor, tensor: OutputTensor, key: str, step_dir: str
) -> ConversionError:
    """NaN/Inf in the rows written come from NaN/Inf in the source or from values the export
    dtype cannot hold (the cast makes them Inf); ``rows`` are the source rows they were cast
    from, which tell the two apart."""
    in_source = int((~torch.isfinite(rows)).sum()) if rows.is_floating_point() else 0
    if in_source:
        what = f"{in_source} NaN/Inf values"
    else:
        largest = float(rows.abs().max())
        what = f"values up to {largest:.3g}, beyond what {tensor.dtype} holds"
    return ConversionError(
        f"{key!r} in {step_dir} holds {what} (output {tensor.name!r}). The shard data "
        "is corrupt, training diverged, or the export dtype is too narrow. Convert another "
        "step, choose another experiment.export_dtype, or set allow_nonfinite=true to write "
        "the values anyway (the manifest counts them)."
    )
