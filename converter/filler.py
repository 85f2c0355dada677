"""Filling an output's files in place: each tensor's bytes go to where its format put them.

The format writes every file's structure first, so each tensor's bytes have a known, disjoint
byte range before any is written. The run that created the files fills them, and so do the other
tasks of a SLURM job that share the conversion (``converter.tasks``), each with a ``Filler`` of
its own on the same files: the writes need no coordination.

Bytes go in through ``pwrite``, at most 1 MiB per call. The page cache sizes its folios by
the write, and a call of several MiB takes fresh multi-MiB folios: on a VM whose host takes
back the guest's free memory in large blocks (free page reporting, as on the benchmark
machine), the copy into those ran several times slower than into the smaller folios of 1 MiB
calls (benchmarks/RESULTS.md: the floor's 8 MiB rows). Each cast lands in the worker's pooled
buffer first. Writing through shared mappings of the file instead saves that copy but costs
more: a page fault per 4 KiB, and a mapping set up and torn down per tensor, hundreds of them
for a mixture-of-experts model's experts.

Each write is handed, with its digest, to a ``Follower``: the read-back that checks it
(``converter.verify``), which in a large output follows the writes and drops the pages it has
read once they are on the disk. A task filling its share of another's files has none.

A lone run allocates the files' blocks first: a full disk then fails up front, with ENOSPC,
rather than after minutes of work. Tasks that share a conversion skip that: they may run on
several nodes, and on a network file system ``posix_fallocate`` may be emulated by writing
zeros, over another task's tensors.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import xxhash

from converter.errors import output_error

# Write-back starts every this many bytes written to a file (see _Flusher).
_FLUSH_BYTES = 128 << 20
# The most one write call copies (see the module's docstring).
_WRITE_BYTES = 1 << 20


@dataclass(frozen=True)
class Region:
    """A byte range written into an output tensor and the XXH3-64 digest of its bytes."""

    start: int
    length: int
    digest: int


class Follower(Protocol):
    """What reads the files back behind their writes (``converter.verify.ReadBehind``)."""

    def wrote(self, name: str, region: Region) -> None:
        """``region`` of tensor ``name`` is in the file."""

    def check(self) -> None:
        """Raises what it met (bytes that differ from those written)."""

    def stop(self) -> None:
        """Stops following, if it has not finished (a conversion that failed)."""


class Filler:
    """The files of an output under construction, open for their tensors' bytes."""

    def __init__(
        self,
        files: dict[str, Path],
        offsets: dict[str, tuple[str, int]],
        output: Path,
        *,
        allocate: bool = False,
        follower: Follower | None = None,
    ) -> None:
        """``files``: the files by their name in the output (``""`` for a one-file output) ->
        the partial file being written; ``offsets``: tensor -> (file, byte offset of its data);
        ``output``: the final name, which error messages give. ``allocate``: allocate the
        files' blocks first (a lone run); ``follower``: what reads the writes back (see the
        module's docstring), stopped when the filler closes."""
        self.files = files
        self.offsets = offsets
        self._output = output
        self._follower = follower
        self._fds: dict[str, int] = {}
        self._syncing: Future[None] | None = None
        try:
            for name, path in files.items():
                # Read and write: where the file system cannot allocate, glibc's
                # posix_fallocate falls back to reading and writing a byte per block.
                self._fds[name] = os.open(path, os.O_RDWR if allocate else os.O_WRONLY)
                if allocate:
                    os.posix_fallocate(self._fds[name], 0, os.fstat(self._fds[name]).st_size)
        except OSError as e:
            self.close()
            raise output_error(output, e) from e
        self._flusher = _Flusher()
        self._places = {file: i for i, file in enumerate(files)}

    @property
    def closed(self) -> bool:
        return not self._fds

    def position(self, name: str) -> tuple[int, int]:
        """Where tensor ``name``'s bytes start: (the file's place among the files, offset)."""
        file, offset = self.offsets[name]
        return self._places[file], offset

    def write(self, name: str, byte_offset: int, data: torch.Tensor) -> Region:
        """Writes ``data``'s bytes at ``byte_offset`` within tensor ``name``'s data; returns
        the region written, with the digest of the bytes given."""
        file, start = self.offsets[name]
        fd = self._fds[file]
        # Flat bytes: a short write (a filling disk) resumes at the right byte, and the next
        # pwrite reports why, rather than slicing a multi-dimensional view by rows.
        view = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
        region = Region(byte_offset, len(view), xxhash.xxh3_64_intdigest(view))
        pos = start + byte_offset
        try:
            self._flusher.check()
            if self._follower is not None:
                self._follower.check()
            while view:
                written = os.pwrite(fd, view[:_WRITE_BYTES], pos)
                view, pos = view[written:], pos + written
                self._flusher.wrote(fd, written)
        except OSError as e:
            raise output_error(self._output, e) from e
        if self._follower is not None:
            self._follower.wrote(name, region)
        return region

    def sync(self) -> None:
        """Makes what was written durable, and closes the files."""
        self.sync_behind().result()

    def sync_behind(self) -> Future[None]:
        """Starts making what was written durable, on a thread of its own, and closes the files
        when it is done; the future raises what the sync met. The output can be read back
        meanwhile: the bytes the read-back checks are the page cache's, synced or not, and the
        disk's last writes no longer wait for it."""
        assert self._fds and self._syncing is None, "closed, or syncing already"
        self._syncing = Future()
        threading.Thread(target=self._sync, name="fsync", daemon=True).start()
        return self._syncing

    def _sync(self) -> None:
        assert self._syncing is not None
        error: BaseException | None = None
        try:
            self._flusher.close()
            self._flusher.check()
            for fd in self._fds.values():
                os.fsync(fd)
        except OSError as e:
            error = output_error(self._output, e)
        except BaseException as e:
            error = e
        self._close_files()  # before the future says it is done: then the files are closed
        if error is None:
            self._syncing.set_result(None)
        else:
            self._syncing.set_exception(error)

    def close(self) -> None:
        """Closes the files (once a sync under way has ended)."""
        if self._syncing is not None:
            wait([self._syncing])
        if self._follower is not None:
            self._follower.stop()
        self._close_files()

    def _close_files(self) -> None:
        if hasattr(self, "_flusher"):
            self._flusher.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class _Flusher:
    """Flushes the output's files behind the writes, on a thread of its own.

    Below the kernel's background write-back threshold (10% of RAM here) every dirty page of
    the output would wait for the final fsync, which would then write the whole output while
    the CPUs sit idle. An ``fdatasync`` of a file every ``_FLUSH_BYTES`` written to it keeps the
    disk writing while the conversion computes, and leaves the final fsync the last few blocks.
    It also bounds the dirty memory a large conversion leaves behind.
    """

    def __init__(self) -> None:
        self._pending: dict[int, int] = {}
        self._due: list[int] = []
        self._cond = threading.Condition()
        self._closing = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="flush-behind", daemon=True)
        self._thread.start()

    def wrote(self, fd: int, nbytes: int) -> None:
        with self._cond:
            self._pending[fd] = self._pending.get(fd, 0) + nbytes
            if self._pending[fd] >= _FLUSH_BYTES:
                self._pending[fd] = 0
                if fd not in self._due:
                    self._due.append(fd)
                self._cond.notify()

    def check(self) -> None:
        """Raises the error a flush met (a full disk shows here first)."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                fd = self._due.pop(0)
            try:
                os.fdatasync(fd)
            except OSError as e:
                self._error = e
                return
