"""Reading the output back, and checking it against what was converted.

Each file is read back in one pass in order (``ReadBehind``), from the page cache: it gives
the file's XXH3-128 digest for the manifest (and sha256, when asked for) and, with
``verify=true``, checks every written byte, each region's XXH3-64 digest against the one
taken of the cast source data as it was written: bit-exact against the source after the
cast, without reading the source a second time. Once every tensor is written, each file is
loaded as its consumer loads it (``torch.load(mmap=True, weights_only=True)`` for a ``.pt``,
safetensors' ``safe_open`` for a shard), its names, shapes and dtypes compared with the plan,
and the places that load gives each tensor's bytes with those the pass checked.

In a large output the pass follows the writes, which go in the files' order
(``converter.engine``), while the page cache still holds what was just written, and it drops
the pages it has read once they are on the disk. A conversion streams gigabytes it will not
read again: left in the page cache, they make every later write take memory never used
before, which on a VM whose host takes free memory back costs more than the copy itself
(benchmarks/README.md), and on a checkpoint larger than memory they would push out the source
being read. The kernel keeps dirty pages whatever it is told, so a page is never lost.

The check that tied embeddings are tied runs whatever ``verify`` says: it is a check of the
settings, not of the write.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from converter.digests import ALGORITHMS, hasher, piece_buffer, pieces
from converter.errors import ConversionError
from converter.filler import Region
from converter.formats.base import OutputFormat
from converter.plan import OutputTensor, Plan
from converter.sources.reader import TensorReader

# Following the writes, the pass syncs a file and drops the pages it has read every this many
# bytes it reads of it, and at its end.
_DROP_BYTES = 128 << 20


@dataclass(frozen=True)
class Staged:
    """One file of the output, built under its partial name."""

    name: str  # its name in the output ("" for a one-file output)
    path: Path
    tensors: list[OutputTensor]
    offsets: dict[str, int]  # where each tensor's bytes start in it


class ReadBehind:
    """Reads the output's files back in order as their regions are written (see the module's
    docstring); a ``converter.filler.Follower``. The bytes between the tensors' (the format's
    structure, written as the files were created) are read as the pass reaches them; a
    tensor's, once the region that starts where the pass stands is written. The tensors
    ``whole`` are hashed whole too, for the checks that compare them.

    The pass follows the writes, on a thread of its own, once more than ``lag`` bytes of
    regions are written ahead of it: an output that small stays in the page cache and is read
    once the writes end, without taking CPU time from a conversion that needs it (a
    mixture-of-experts model's thousands of small tensors). With ``lag=None`` it never
    follows: a conversion shared by tasks reads the others' bytes once they answer, through a
    file opened then (on NFS, a file opened before another node wrote may serve pages cached
    before). What is left once the writes end is read with the files side by side, on up to
    ``workers`` threads."""

    def __init__(
        self,
        files: list[Staged],
        check: bool,
        sha256: bool,
        *,
        whole: Collection[str] = (),
        lag: int | None = 1 << 30,
        workers: int = 1,
    ) -> None:
        algorithms = ALGORITHMS[: 2 if sha256 else 1]
        self._files = {f.name: _Followed(f, algorithms, set(whole)) for f in files}
        self._holding = {t: f for f in self._files.values() for t in f.staged.offsets}
        self._check = check
        self._lag = lag
        self._workers = workers
        self._unread = 0  # bytes of regions written but not read back yet
        self._cond = threading.Condition()
        self._ended = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._follow, name="read-behind", daemon=True)
        if lag is not None:
            self._thread.start()

    def wrote(self, name: str, region: Region) -> None:
        if not region.length:
            return
        followed = self._holding[name]
        with self._cond:
            followed.written[followed.staged.offsets[name] + region.start] = (name, region)
            self._unread += region.length
            if self._lag is not None and self._unread > self._lag:
                self._cond.notify()

    def check(self) -> None:
        """Raises what the pass met while following (a region's bytes differ)."""
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        for followed in self._files.values():
            followed.close()

    def finish(self) -> dict[str, dict[str, str]]:
        """Once every region is written: reads what is left, and returns each file's digests;
        raises if a region's bytes differ, or bytes were never written."""
        self.stop()
        self.check()
        files = list(self._files.values())
        with ThreadPoolExecutor(max_workers=max(1, min(self._workers, len(files)))) as pool:
            list(pool.map(lambda f: f.drain(self._check), files))  # raises what one met
        for followed in files:
            followed.check_whole()
        return {name: f.digests() for name, f in self._files.items()}

    def tensor_digest(self, name: str) -> str:
        """The XXH3-128 of tensor ``name``'s bytes (one of ``whole``), once finished."""
        return self._holding[name].whole[name].hexdigest()

    def _follow(self) -> None:
        buffer = piece_buffer()
        try:
            while True:
                with self._cond:
                    assert self._lag is not None
                    while not self._ended and not (
                        self._unread > self._lag and (step := self._next())
                    ):
                        self._cond.wait()
                    if self._ended:
                        return
                followed, end, written = step
                followed.read_to(end, written, self._check, buffer)
                followed.drop_behind()
                if written is not None:
                    with self._cond:
                        self._unread -= written[1].length
        except BaseException as e:  # raised by check() and finish()
            self._error = e

    def _next(self) -> tuple[_Followed, int, tuple[str, Region] | None] | None:
        """The next range to read: the format's bytes up to the next tensor's, or the region
        written where the pass stands (held under the lock)."""
        for followed in self._files.values():
            if (step := followed.next()) is not None:
                return step
        return None


class _Followed:
    """One file, read back up to ``read``."""

    def __init__(self, staged: Staged, algorithms: tuple[str, ...], whole: set[str]) -> None:
        self.staged = staged
        self.size = staged.path.stat().st_size
        data = sorted(
            (staged.offsets[t.name], t.dtype.itemsize * _numel(t.shape), t.name)
            for t in staged.tensors
        )
        self._data = [(start, start + n, name) for start, n, name in data if n]
        self._starts = [start for start, _, _ in self._data]
        self.read = 0
        self._dropped = 0  # the pages before it are dropped
        self.written: dict[int, tuple[str, Region]] = {}  # by where they start in the file
        self._hashes = {a: hasher(a) for a in algorithms}
        self.whole = {n: xxhash.xxh3_128() for n in whole & staged.offsets.keys()}
        self._fd: int | None = None

    def next(self) -> tuple[_Followed, int, tuple[str, Region] | None] | None:
        if self.read >= self.size:
            return None
        if (written := self.written.pop(self.read, None)) is not None:
            return self, self.read + written[1].length, written
        i = bisect.bisect_right(self._starts, self.read) - 1
        if i >= 0 and self.read < self._data[i][1]:
            return None  # within a tensor: waits for the region that starts here
        following = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
        return self, following, None

    def read_to(
        self, end: int, written: tuple[str, Region] | None, check: bool, buffer: bytearray
    ) -> None:
        """Hashes bytes ``read`` to ``end``: the region ``written``, if given, whose digest
        they must have with ``check``."""
        if self._fd is None:
            self._fd = os.open(self.staged.path, os.O_RDONLY)
        hashes = list(self._hashes.values())
        if written is not None and written[0] in self.whole:
            hashes.append(self.whole[written[0]])
        region_hash = xxhash.xxh3_64()
        if check and written is not None:
            hashes.append(region_hash)
        for piece in pieces(self._fd, self.read, end, buffer):
            for h in hashes:
                h.update(piece)
            self.read += len(piece)
        if self.read < end:
            raise _mismatch(self.staged.path, f"it ends at byte {self.read}, before byte {end}")
        if check and written is not None and region_hash.intdigest() != written[1].digest:
            name, r = written
            raise _mismatch(self.staged.path, f"bytes {r.start}..{r.start + r.length} of {name!r}")

    def drop_behind(self) -> None:
        """Every ``_DROP_BYTES`` read, and at the file's end: syncs the file, then drops the
        pages read before the sync (on the disk by then). Advice: a file system that fails
        either keeps the pages, and the final sync reports a write that failed."""
        if self.read - self._dropped < _DROP_BYTES and self.read < self.size:
            return
        done = self.read
        with contextlib.suppress(OSError):
            assert self._fd is not None
            os.fdatasync(self._fd)
            os.posix_fadvise(self._fd, self._dropped, done - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = done
        if self.read == self.size:
            self.close()

    def drain(self, check: bool) -> None:
        """Reads what is left, once every region is written."""
        buffer = piece_buffer()
        try:
            while (step := self.next()) is not None:
                _, end, written = step
                self.read_to(end, written, check, buffer)
        finally:
            self.close()

    def check_whole(self) -> None:
        """Every byte read and every region written read, the file as large as it was."""
        path = self.staged.path
        if self.read < self.size:  # within a tensor: the structure's bytes are there
            name = self._data[bisect.bisect_right(self._starts, self.read) - 1][2]
            raise _mismatch(path, f"{name!r} was not written exactly once in full")
        if self.written:
            name = min(self.written.values(), key=lambda w: w[1].start)[0]
            raise _mismatch(path, f"{name!r} was not written exactly once in full")
        if (size := path.stat().st_size) != self.size:
            raise _mismatch(path, f"its size changed from {self.size} to {size} bytes")

    def digests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self._hashes.items()}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_back(
    fmt: OutputFormat,
    files: list[Staged],
    plan: Plan,
    reader: TensorReader,
    behind: ReadBehind,
    regions: Mapping[str, list[Region]] | None,
) -> dict[str, dict[str, str | int]]:
    """Each file's size and digests, once every tensor is written. With ``regions`` (what the
    conversion wrote, for ``verify=true``: ``behind`` then checks each region's bytes), each
    tensor must be covered by them exactly once, and the file must load as its consumer loads
    it, each tensor where it was written (see the module's docstring)."""
    if regions is not None:
        for staged in files:
            for spec in staged.tensors:
                _check_covered(staged.path, spec, regions[spec.name])
    digests = behind.finish()
    _check_tied(plan, files, reader, behind)
    if regions is not None:
        for staged in files:
            try:
                offsets = fmt.read_back(staged.path, staged.tensors)
            except ValueError as e:
                raise _mismatch(staged.path, str(e)) from e
            if moved := [n for n, o in staged.offsets.items() if offsets[n] != o]:
                raise _mismatch(staged.path, f"{moved[0]!r} loads from other bytes than written")
    return {
        staged.name: {"bytes": staged.path.stat().st_size, **digests[staged.name]}
        for staged in files
    }


def _check_covered(path: Path, spec: OutputTensor, written: list[Region]) -> None:
    """The regions written into ``spec`` must cover it exactly once, from byte 0 on."""
    written = sorted(written, key=lambda r: r.start)
    ends = [0] + [r.start + r.length for r in written]
    gaps = any(r.start != end for r, end in zip(written, ends[:-1], strict=True))
    if gaps or ends[-1] != spec.dtype.itemsize * _numel(spec.shape):
        raise _mismatch(path, f"{spec.name!r} was not written exactly once in full")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_tied(plan: Plan, files: list[Staged], reader: TensorReader, behind: ReadBehind) -> None:
    """With ``tied_embeddings=true``, a head saved beside the embeddings must hold their values
    (after the cast): the consumer ties the two on load, so a file that left out (or kept) a
    different head would silently load as another model. The head's rows from the source, cast
    a window at a time (bounded memory), are compared by their XXH3-128 with the embeddings'
    bytes as the read-back hashed them: the output is not read again."""
    written = {t.name: t for f in files for t in f.tensors}
    for source_key, name in plan.tied:
        entry = reader.index.tensors[source_key]
        if written[name].shape != entry.shape:
            raise _untied(source_key, name, reader)
        head = xxhash.xxh3_128()
        rows = entry.rows[0]
        step = max(1, (16 << 20) // max(entry.row_bytes, 1))
        for lo in range(0, rows, step):
            hi = min(lo + step, rows)
            buffer = torch.empty(reader.buffer_bytes(entry, hi - lo), dtype=torch.uint8)
            cast = reader.read_rows(entry, lo, hi, buffer).to(written[name].dtype)
            head.update(cast.contiguous().view(torch.uint8).reshape(-1).numpy())
        if head.hexdigest() != behind.tensor_digest(name):
            raise _untied(source_key, name, reader)


def _untied(source_key: str, name: str, reader: TensorReader) -> ConversionError:
    step_dir = reader.storage.display(reader.index.step_dir)
    return ConversionError(
        f"experiment.model.tied_embeddings=true, but {source_key!r} in {step_dir} differs from "
        f"the embeddings written as {name!r}: the model does not tie them. Set "
        "experiment.model.tied_embeddings=false."
    )


def _mismatch(path: Path, what: str) -> ConversionError:
    return ConversionError(
        f"Verification of {path} failed: {what}. The file was not kept. This points at a "
        "storage fault while writing; run again, and report it if it persists."
    )
