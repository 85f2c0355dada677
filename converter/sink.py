"""Writing the output ``.pt``: structure first, tensor bytes filled in place, then an atomic rename.

``torch.save`` under ``torch.serialization.skip_data`` writes the whole archive (pickled
structure, one stored, 64-byte-aligned record per tensor) but leaves the records' bytes empty.
We then write each tensor's bytes straight into its record with ``pwrite``, so that no more than
one chunk per worker is ever in memory, workers can fill disjoint tensors concurrently, and the
file is a plain ``torch.save`` archive that ``torch.load(mmap=True, weights_only=True)`` reads.

Nothing is written under the final name until the file is complete and synced: the work goes to
a hidden ``.<name>.partial`` beside it, guarded by an advisory lock on ``.<name>.lock`` so that
two conversions to one output never interleave. A partial left by a killed run is removed by the
next run that takes the lock. A failed run leaves nothing behind: not the partial, not the lock
file, not the output folder if it created it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

import torch

from converter.archive import storage_records
from converter.errors import ConversionError

log = logging.getLogger(__name__)


class OutputFile:
    """One output file under construction; use as a context manager around the whole write."""

    def __init__(self, path: Path, sidecars: tuple[Path, ...] = ()) -> None:
        """``sidecars``: small files written beside the output (manifest, recipe snippet) with
        ``write_atomic``; while the output does not exist they and their temporaries are left
        over from an interrupted run, and are removed."""
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        self.lock_path = path.with_name(f".{path.name}.lock")
        self.sidecars = sidecars
        self.offsets: dict[str, int] = {}
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._made_dirs: list[Path] = []

    def __enter__(self) -> OutputFile:
        try:
            _make_dirs(self.path.parent, self._made_dirs)
            self._lock_fd = _lock(self.lock_path)
        except OSError as e:
            self._remove_made_dirs()
            raise output_error(self.path, e) from e
        except BaseException:
            self._remove_made_dirs()
            raise
        if self._lock_fd is None:
            raise ConversionError(
                f"Another conversion is writing {self.path} right now (it holds "
                f"{self.lock_path}). Wait for it to finish, or write to another output."
            )
        if self.partial.exists():
            log.info("Removing %s left by an interrupted run.", self.partial)
        try:
            self._remove_leftovers()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            if isinstance(e, OSError):
                raise output_error(self.path, e) from e
            raise
        return self

    def create(self, layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """Writes the archive's structure for tensors ``name -> (shape, dtype)``, in order."""
        # torch.empty leaves the pages untouched, so this costs address space, not memory.
        skeleton = {
            name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in layout.items()
        }
        try:
            # Through a Python file object, not a path: torch's own file writer reports a full
            # disk or an exceeded size limit as a bare RuntimeError ("unexpected pos"), Python's
            # as the OSError with its errno. The skipped data is seeked over, not written.
            with open(self.partial, "wb") as f, torch.serialization.skip_data():
                torch.save(skeleton, f)
            self.offsets = record_offsets(self.partial)
            self._fd = os.open(self.partial, os.O_WRONLY)
        except OSError as e:
            raise output_error(self.path, e) from e

    def write(self, name: str, byte_offset: int, data: torch.Tensor) -> None:
        """Writes ``data``'s bytes at ``byte_offset`` within tensor ``name``'s record."""
        assert self._fd is not None, "create() first"
        # Flat bytes: a short write (a filling disk) resumes at the right byte, and the next
        # pwrite reports why, rather than slicing a multi-dimensional view by rows.
        view = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
        pos = self.offsets[name] + byte_offset
        try:
            while view:
                written = os.pwrite(self._fd, view, pos)
                view, pos = view[written:], pos + written
        except OSError as e:
            raise output_error(self.path, e) from e

    def sync(self) -> None:
        """Makes the partial file complete and durable; it can be read back after this."""
        assert self._fd is not None, "create() first"
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        except OSError as e:
            raise output_error(self.path, e) from e

    def publish(self) -> None:
        """Gives the synced file its final name in one atomic step."""
        assert self._fd is None, "sync() first"
        try:
            os.replace(self.partial, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            raise output_error(self.path, e) from e

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            self._remove_leftovers()
        finally:
            if self._lock_fd is not None:
                # Unlinked while still held: a run that opened the old file notices (see _lock).
                self.lock_path.unlink(missing_ok=True)
                os.close(self._lock_fd)  # releases the lock
                self._lock_fd = None
            if exc_type is not None:
                self._remove_made_dirs()

    def _remove_leftovers(self) -> None:
        """The partial, and sidecars that belong to no output (a run killed before publish)."""
        self.partial.unlink(missing_ok=True)
        orphaned = not self.path.exists()
        for sidecar in self.sidecars:
            sidecar.with_name(f".{sidecar.name}.partial").unlink(missing_ok=True)
            if orphaned:
                sidecar.unlink(missing_ok=True)

    def _remove_made_dirs(self) -> None:
        """Output folders this run created, if still empty: a failed run leaves no trace."""
        for folder in reversed(self._made_dirs):
            try:
                folder.rmdir()
            except OSError:
                break
        self._made_dirs = []


def _make_dirs(folder: Path, made: list[Path]) -> None:
    """``mkdir -p``; appends the folders it creates to ``made``, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise
            continue
        made.append(path)


def _lock(path: Path) -> int | None:
    """Takes the exclusive lock on ``path``; None if another process holds it.

    The holder unlinks the lock file before it releases it, so that no lock file outlives a
    run; a process that opened the file before that unlink then holds a lock on a file no
    longer there, which is why the inode is checked after taking it, and taken anew if needed.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def record_offsets(path: Path, loaded: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Byte offset in the file of each tensor's data, as ``torch.load`` sees the file.

    Loaded with ``mmap=True``, every tensor is a view into one mapping of the file, so its data
    pointer minus the mapping's base is its offset. We pair those with the zip records' offsets
    in file order and check that sizes and spacing agree, rather than trusting record naming.
    No tensor data is touched, so this costs no memory. ``loaded`` is that load, if the caller
    has it already.
    """
    if loaded is None:
        loaded = torch.load(path, mmap=True, weights_only=True)
    with open(path, "rb") as f:
        records = [r for r in storage_records(f) if r[1]]  # empty tensors need no bytes
    storages = sorted(
        (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), name)
        for name, t in loaded.items()
        if t.untyped_storage().nbytes()
    )
    if len(storages) != len(records):
        raise RuntimeError(f"{path}: {len(records)} data records for {len(storages)} tensors")
    base = storages[0][0] - records[0][0] if storages else 0
    offsets = {name: 0 for name in loaded}
    for (ptr, nbytes, name), (offset, size) in zip(storages, records, strict=True):
        if ptr - base != offset or nbytes != size or loaded[name].storage_offset():
            raise RuntimeError(f"{path}: record at byte {offset} does not hold tensor {name!r}")
        offsets[name] = offset
    return offsets


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_WHY = {
    errno.ENOSPC: ("the disk is full", "free space on it"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within the quota"),
    errno.EFBIG: (
        "the file size limit (ulimit -f) is exceeded",
        "raise the limit (ulimit -f unlimited, or the job's RLIMIT_FSIZE)",
    ),
    errno.EACCES: ("permission is denied", "make the folder writable for this user"),
    errno.EPERM: ("permission is denied", "make the folder writable for this user"),
    errno.EROFS: ("the file system is read-only", "write to a writable file system"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "fix the path"),
    errno.EISDIR: ("the output path is a folder", "name a .pt file"),
}


def output_error(path: Path, e: OSError) -> ConversionError:
    """The paragraph for an OSError met while writing ``path``: what failed, and the fix."""
    why, fix = _WHY.get(e.errno or 0, (e.strerror or str(e), "fix the cause"))
    where = f" (at {e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return ConversionError(
        f"Cannot write {path}: {why}{where}. Nothing was written under that name; {fix}, or "
        "choose another experiment.output, then run again."
    )
