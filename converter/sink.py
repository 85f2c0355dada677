"""Writing the output ``.pt``: structure first, tensor bytes filled in place, then an atomic rename.

``torch.save`` under ``torch.serialization.skip_data`` writes the whole archive (pickled
structure, one stored, 64-byte-aligned record per tensor) but leaves the records' bytes empty.
We then write each tensor's bytes straight into its record with ``pwrite``, so that no more than
one chunk per worker is ever in memory, workers can fill disjoint tensors concurrently, and the
file is a plain ``torch.save`` archive that ``torch.load(mmap=True, weights_only=True)`` reads.

Nothing is written under the final name until the file is complete and synced: the work goes to
a hidden ``.<name>.partial`` beside it, guarded by an advisory lock on ``.<name>.lock`` so that
two conversions to one output never interleave. The files that describe the output (manifest,
recipe snippet) are written and synced under temporary names too, and renamed into place only
after the output, so that none is ever seen without its output. A partial, or a described file
without its output, left by a killed run is removed by the next run that takes the lock; a run
killed between the output's rename and its sidecars' has its publish finished by the next. A
failed run leaves nothing behind: not the partial, not the lock file, no described file, not
the output folder if it created it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import torch

from converter.archive import storage_records
from converter.errors import ConversionError
from converter.manifest import stage, staging_path

log = logging.getLogger(__name__)

# Write-back starts every this many bytes written (see _Flusher).
_FLUSH_BYTES = 128 << 20


class OutputFile:
    """One output file under construction; use as a context manager around the whole write."""

    def __init__(
        self,
        path: Path,
        sidecars: tuple[Path, ...] = (),
        describes: Callable[[dict[Path, Path]], bool] | None = None,
    ) -> None:
        """``sidecars``: small files that describe the output (manifest, recipe snippet),
        published by :meth:`publish` after it; while the output does not exist they and their
        temporaries are left over from an interrupted run, and are removed.

        ``describes(staged)``, given the staged temporaries (sidecar -> temporary) that a run
        killed during publish left beside an existing output, says whether they describe that
        very file; if so, the publish is finished, otherwise they are removed."""
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        self.lock_path = path.with_name(f".{path.name}.lock")
        self.sidecars = sidecars
        self.describes = describes
        self.filler: Filler | None = None
        self._lock_fd: int | None = None
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
            self._finish_interrupted_publish()
            self._remove_leftovers()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            if isinstance(e, OSError):
                raise output_error(self.path, e) from e
            raise
        return self

    def create(self, layout: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Filler:
        """Writes the archive's structure for tensors ``name -> (shape, dtype)``, in order;
        returns the means to fill in their bytes."""
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
            offsets = record_offsets(self.partial)
        except OSError as e:
            raise output_error(self.path, e) from e
        self.filler = Filler(self.partial, offsets, self.path)
        return self.filler

    def publish(self, texts: dict[Path, str] | None = None) -> None:
        """Gives the filled and synced file its final name in one atomic step, then each of
        the sidecars its contents from ``texts`` (sidecar -> text), in that order.

        The sidecars are written and synced under temporary names first (a full disk fails
        here, before anything is published) and renamed only after the output, so none is
        ever seen without the output it describes. If any step fails, what this call renamed
        into place is removed again: nothing is left under the output's or a sidecar's name.
        """
        assert self.filler is not None and self.filler.closed, "fill and sync() first"
        texts = texts or {}
        assert set(texts) <= set(self.sidecars), "publish only the sidecars named up front"
        staged: list[tuple[Path, Path]] = []
        published: list[Path] = []
        try:
            for sidecar, text in texts.items():
                staged.append((stage(sidecar, text), sidecar))
            os.replace(self.partial, self.path)
            published.append(self.path)
            for tmp, sidecar in staged:
                os.replace(tmp, sidecar)
                published.append(sidecar)
            _fsync_dir(self.path.parent)
        except BaseException as e:
            for path in reversed(published):
                path.unlink(missing_ok=True)
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise output_error(self.path, e) from e
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.filler is not None:
            self.filler.close()
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

    def _finish_interrupted_publish(self) -> None:
        """A run killed between renaming the output and the last sidecar into place left the
        sidecars it had not renamed yet staged, complete and synced (:meth:`publish` stages them
        all first). If they describe the output, rename them now, as that run would have."""
        staged = {s: t for s in self.sidecars if (t := staging_path(s)).is_file()}
        if not (staged and self.path.is_file() and self.describes and self.describes(staged)):
            return
        for sidecar, tmp in staged.items():
            os.replace(tmp, sidecar)
        _fsync_dir(self.path.parent)
        log.warning(
            "Finished publishing %s: an earlier run was stopped after renaming it into place "
            "and before %s; they were staged, and describe this very file.",
            self.path,
            ", ".join(str(s) for s in staged),
        )

    def _remove_leftovers(self) -> None:
        """The partial, the sidecars' temporaries, and sidecars that describe no output (left
        by a run killed during publish, or by an older version that wrote them first)."""
        self.partial.unlink(missing_ok=True)
        orphaned = not self.path.is_file()
        for sidecar in self.sidecars:
            _remove_file(staging_path(sidecar))
            if orphaned and _remove_file(sidecar):
                log.info(
                    "Removed %s: the output it describes, %s, does not exist.", sidecar, self.path
                )

    def _remove_made_dirs(self) -> None:
        """Output folders this run created, if still empty: a failed run leaves no trace."""
        for folder in reversed(self._made_dirs):
            try:
                folder.rmdir()
            except OSError:
                break
        self._made_dirs = []


class Filler:
    """An output file under construction, open for its tensors' bytes to be written in place.

    The run that created the file fills it, and so do the other tasks of a SLURM job that
    share the conversion (``converter.tasks``), each with a ``Filler`` of its own on the same
    file: writes go to disjoint byte ranges, so they need no coordination.
    """

    def __init__(self, partial: Path, offsets: dict[str, int], output: Path) -> None:
        """``offsets``: where each tensor's bytes start in ``partial``; ``output``: the final
        name, which error messages give."""
        self.partial = partial
        self.offsets = offsets
        self._output = output
        try:
            self._fd: int | None = os.open(partial, os.O_WRONLY)
        except OSError as e:
            raise output_error(output, e) from e
        self._flusher = _Flusher(self._fd)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, name: str, byte_offset: int, data: torch.Tensor) -> None:
        """Writes ``data``'s bytes at ``byte_offset`` within tensor ``name``'s record."""
        assert self._fd is not None, "closed"
        # Flat bytes: a short write (a filling disk) resumes at the right byte, and the next
        # pwrite reports why, rather than slicing a multi-dimensional view by rows.
        view = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
        pos = self.offsets[name] + byte_offset
        try:
            self._flusher.check()
            while view:
                written = os.pwrite(self._fd, view, pos)
                view, pos = view[written:], pos + written
                self._flusher.wrote(written)
        except OSError as e:
            raise output_error(self._output, e) from e

    def sync(self) -> None:
        """Makes what was written durable, and closes the file."""
        assert self._fd is not None, "closed"
        try:
            self._flusher.close()
            self._flusher.check()
            os.fsync(self._fd)
        except OSError as e:
            raise output_error(self._output, e) from e
        finally:
            self.close()

    def close(self) -> None:
        self._flusher.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Flusher:
    """Flushes the output behind the writes, on a thread of its own.

    Below the kernel's background write-back threshold (10% of RAM here) every dirty page of
    the output would wait for the final fsync, which would then write the whole file while the
    CPUs sit idle: 1.7 s of a 1.3 GB conversion here. An ``fdatasync`` every ``_FLUSH_BYTES``
    keeps the disk writing while the conversion computes, and leaves the final fsync the last
    few blocks (0.2 s). It also bounds the dirty memory a large conversion leaves behind.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = 0
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._closing = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="flush-behind", daemon=True)
        self._thread.start()

    def wrote(self, nbytes: int) -> None:
        with self._lock:
            self._pending += nbytes
            if self._pending >= _FLUSH_BYTES:
                self._pending = 0
                self._wanted.set()

    def check(self) -> None:
        """Raises the error a flush met (a full disk shows here first)."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._closing = True
        self._wanted.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                self._error = e
                return


def _remove_file(path: Path) -> bool:
    """Removes ``path`` if it is a file or a link; never a folder. True if it removed it."""
    if not (path.is_symlink() or path.is_file()):
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


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
    errno.EISDIR: ("a folder is in the way", "choose a file path, or remove the folder"),
}


def output_error(path: Path, e: OSError) -> ConversionError:
    """The paragraph for an OSError met while writing ``path``: what failed, and the fix."""
    why, fix = _WHY.get(e.errno or 0, (e.strerror or str(e), "fix the cause"))
    where = f" (at {e.filename})" if e.filename and str(e.filename) != str(path) else ""
    return ConversionError(
        f"Cannot write {path}: {why}{where}. Nothing was written under that name; {fix}, or "
        "choose another experiment.output, then run again."
    )
