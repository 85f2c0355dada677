"""Reading the output back, and checking it against what was converted.

Each file is read back in order behind its writes (``ReadBehind``), while the page cache still
holds what was just written: one pass gives its XXH3-128 digest for the manifest (and sha256,
when asked for) and, with ``verify=true``, checks every written byte, each region's XXH3-64
digest against the one taken of the cast source data as it was written: bit-exact against the
source after the cast, without reading the source a second time. The conversion writes in the
files' order (``converter.engine``), so the pass keeps up with it, and the pages it is done
with can be dropped once they are on the disk (``converter.filler``). Once every tensor is
written, each file is loaded as its consumer loads it (``torch.load(mmap=True,
weights_only=True)`` for a ``.pt``, safetensors' ``safe_open`` for a shard), its names, shapes
and dtypes compared with the plan, and the places that load gives each tensor's bytes with
those the pass checked.

The check that tied embeddings are tied runs whatever ``verify`` says: it is a check of the
settings, not of the write.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Collection, Mapping
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


@dataclass(frozen=True)
class Staged:
    """One file of the output, built under its partial name."""

    name: str  # its name in the output ("" for a one-file output)
    path: Path
    tensors: list[OutputTensor]
    offsets: dict[str, int]  # where each tensor's bytes start in it


class ReadBehind:
    """Reads the output's files back in order as their regions are written (see the module's
    docstring), on a thread of its own; a ``converter.filler.Follower``. The bytes between the
    tensors' (the format's structure, written as the files were created) are read as the pass
    reaches them; a tensor's, once the region that starts where the pass stands is written.
    The tensors ``whole`` are hashed whole too, for the checks that compare them.

    The pass lets up to ``lag`` bytes of regions be written ahead of it before it follows: an
    output that small stays in the page cache and is read in one pass once the writes end,
    without taking CPU time from a conversion that needs it (a mixture-of-experts model's
    thousands of small tensors). Past it, the pass follows the writes, and about ``lag``
    bytes of the output are in memory at a time."""

    def __init__(
        self,
        files: list[Staged],
        check: bool,
        sha256: bool,
        whole: Collection[str] = (),
        lag: int = 1 << 30,
    ) -> None:
        algorithms = ALGORITHMS[: 2 if sha256 else 1]
        self._files = {f.name: _Followed(f, algorithms, set(whole)) for f in files}
        self._holding = {t: f for f in self._files.values() for t in f.staged.offsets}
        self._check = check
        self._lag = lag
        self._unread = 0  # bytes of regions written but not read back yet
        self._cond = threading.Condition()
        self._ended = self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="read-behind", daemon=True)
        self._thread.start()

    def wrote(self, name: str, region: Region) -> None:
        if not region.length:
            return
        followed = self._holding[name]
        with self._cond:
            followed.written[followed.staged.offsets[name] + region.start] = (name, region)
            self._unread += region.length
            if self._unread > self._lag:
                self._cond.notify()

    def done_with(self, file: str) -> int:
        return self._files[file].read

    def tensor_digest(self, name: str) -> str:
        """The XXH3-128 of tensor ``name``'s bytes (one of ``whole``), once finished."""
        return self._holding[name].whole[name].hexdigest()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def finish(self) -> dict[str, dict[str, str]]:
        """Once every region is written: reads what is left, and returns each file's digests;
        raises if a region's bytes differ, or bytes were never written."""
        with self._cond:
            self._ended = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        for followed in self._files.values():
            if followed.read < followed.size:  # a tensor's bytes: the structure's are there
                staged, at = followed.staged, followed.read
                name = max((o, n) for n, o in staged.offsets.items() if o <= at)[1]
                raise _mismatch(staged.path, f"{name!r} was not written exactly once in full")
        return {name: f.digests() for name, f in self._files.items()}

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopped:
                        following = self._ended or self._unread > self._lag
                        if (step := self._next() if following else None) or self._ended:
                            break
                        self._cond.wait()
                    if self._stopped or step is None:
                        return
                followed, end, written = step
                followed.read_to(end, written, self._check)
                if written is not None:
                    with self._cond:
                        self._unread -= written[1].length
        except BaseException as e:  # raised by finish()
            self._error = e
        finally:
            for followed in self._files.values():
                followed.close()

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
            (staged.offsets[t.name], t.dtype.itemsize * _numel(t.shape)) for t in staged.tensors
        )
        self._data = [(start, start + n) for start, n in data if n]
        self._starts = [start for start, _ in self._data]
        self.read = 0
        self.written: dict[int, tuple[str, Region]] = {}  # by where they start in the file
        self._hashes = {a: hasher(a) for a in algorithms}
        self.whole = {n: xxhash.xxh3_128() for n in whole & staged.offsets.keys()}
        self._fd: int | None = None
        self._buffer = piece_buffer()

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

    def read_to(self, end: int, written: tuple[str, Region] | None, check: bool) -> None:
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
        for piece in pieces(self._fd, self.read, end, self._buffer):
            for h in hashes:
                h.update(piece)
        if check and written is not None and region_hash.intdigest() != written[1].digest:
            name, r = written
            raise _mismatch(self.staged.path, f"bytes {r.start}..{r.start + r.length} of {name!r}")
        self.read = end

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
    conversion wrote), every byte written is checked: each tensor covered exactly once, each
    region's bytes as written, and the file as its consumer loads it (see the module's
    docstring)."""
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
