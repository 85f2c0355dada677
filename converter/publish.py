"""Publishing an output atomically: a file with its describing files beside it, or a folder.

Nothing is written under the final name until the output is complete and synced: the work goes
to a hidden ``.<name>.partial`` beside it (a file, or a folder of files), guarded by an advisory
lock on ``.<name>.lock`` so that two conversions to one output never interleave.

- A one-file output (``.pt``) is renamed into place, then the files that describe it (manifest,
  recipe snippet), written and synced beforehand under temporary names: none is ever seen
  without its output. A run killed between those renames has its publish finished by the next.
- A folder (Hugging Face) holds its describing files inside; the whole folder, synced file by
  file and as a folder, is renamed into place at once. An existing folder it replaces is first
  renamed aside to ``.<name>.replaced`` and removed after; a run killed in between leaves the
  old folder there, which the next run puts back.

Once an existing output is replaced, the publish is finished before a stopping signal (Ctrl-C,
SIGTERM, SLURM's SIGUSR2) takes effect: rolled back instead, it would leave neither the old
output nor the new one.

A failed run leaves nothing behind: not the partial, not the lock file, no describing file, not
the output's parent folders if it created them. What a killed run left is removed, or repaired,
by the next run that takes the lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from converter.errors import ConversionError, output_error
from converter.filler import Filler, Follower

log = logging.getLogger(__name__)

Content = str | bytes | Path  # a describing file: its text, its bytes, or a file to copy


class Output:
    """One output under construction; use as a context manager around the whole write."""

    def __init__(
        self,
        path: Path,
        folder: bool,
        sidecars: tuple[Path, ...] = (),
        describes: Callable[[dict[Path, Path]], bool] | None = None,
    ) -> None:
        """``folder``: the output is a folder of files. ``sidecars`` (one-file outputs): the
        files beside it that describe it, published by :meth:`publish` after it; while the
        output does not exist they are left over from an interrupted run, and are removed.

        ``describes(staged)``, given the staged temporaries (sidecar -> temporary) that a run
        killed during publish left beside an existing output, says whether they describe that
        very file; if so, the publish is finished, otherwise they are removed."""
        self.path = path
        self.folder = folder
        self.partial = path.with_name(f".{path.name}.partial")
        self.replaced = path.with_name(f".{path.name}.replaced")
        self.lock_path = path.with_name(f".{path.name}.lock")
        self.sidecars = sidecars
        self.describes = describes
        self._lock_fd: int | None = None
        self._made_dirs: list[Path] = []
        self._staged: dict[str, Path] = {}
        self._filler: Filler | None = None

    def __enter__(self) -> Output:
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
            self._restore_replaced()
            self._finish_interrupted_publish()
            self._remove_leftovers()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            if isinstance(e, OSError):
                raise output_error(self.path, e) from e
            raise
        return self

    def staging(self, name: str) -> Path:
        """Where the output's file ``name`` is built (``""``: a one-file output itself)."""
        if not self.folder:
            assert name == "", name
            path = self.partial
        else:
            try:
                self.partial.mkdir(exist_ok=True)
            except OSError as e:
                raise output_error(self.path, e) from e
            path = self.partial / name
            try:
                path.parent.mkdir(parents=True, exist_ok=True)  # a file in a subfolder
            except OSError as e:
                raise output_error(self.path, e) from e
        self._staged[name] = path
        return path

    def filler(
        self,
        offsets: dict[str, tuple[str, int]],
        allocate: bool = False,
        follower: Follower | None = None,
    ) -> Filler:
        """The means to fill the staged files' tensors (tensor -> (file, byte offset));
        ``allocate``, ``follower``: see ``converter.filler``. Closed when the output is,
        whatever happens."""
        self._filler = Filler(
            dict(self._staged), offsets, self.path, allocate=allocate, follower=follower
        )
        return self._filler

    def publish(self, described: dict[Path, Content] | None = None) -> None:
        """Gives the filled and synced output its final name in one atomic step, with the
        files that describe it: name -> text, bytes, or a file to copy. For a one-file output they
        are sidecars (paths beside it, named up front), renamed after it; for a folder, files
        inside it (relative paths), published with it.

        The describing files are written and synced first (a full disk fails here, before
        anything is published). If any step fails, what this call renamed into place is
        removed again: nothing is left under the output's or a sidecar's name."""
        assert self._filler is None or self._filler.closed, "fill and sync() first"
        described = described or {}
        try:
            if self.folder:
                self._publish_folder(described)
            else:
                self._publish_file(described)
        except OSError as e:
            raise output_error(self.path, e) from e

    def _publish_file(self, described: dict[Path, Content]) -> None:
        assert set(described) <= set(self.sidecars), "publish only the sidecars named up front"
        staged: list[tuple[Path, Path]] = []
        try:
            for sidecar, content in described.items():
                staged.append((_write_synced(staging_path(sidecar), content), sidecar))
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        # A stop that arrives during the renames takes effect after them, so it does not
        # unlink what replaced an existing output: only a failing rename rolls back.
        with stops_deferred(f"Published {self.path} with {len(staged)} describing files"):
            published: list[Path] = []
            try:
                os.replace(self.partial, self.path)
                published.append(self.path)
                for tmp, sidecar in staged:
                    os.replace(tmp, sidecar)
                    published.append(sidecar)
                fsync_dir(self.path.parent)
            except BaseException:
                for path in reversed(published):
                    path.unlink(missing_ok=True)
                for tmp, _ in staged:
                    tmp.unlink(missing_ok=True)
                raise

    def _publish_folder(self, described: dict[Path, Content]) -> None:
        for name, content in described.items():
            _write_synced(self.staging(str(name)), content)
        # Every folder in it, so that each file's name is as durable as its bytes.
        for folder in sorted({p.parent for p in self._staged.values()}, reverse=True):
            fsync_dir(folder)
        moved_aside = False
        with stops_deferred(f"Published {self.path}"):
            if self.path.is_dir():
                os.replace(self.path, self.replaced)
                moved_aside = True
            try:
                os.replace(self.partial, self.path)
            except BaseException:
                if moved_aside:
                    os.replace(self.replaced, self.path)
                raise
            fsync_dir(self.path.parent)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._filler is not None:
            self._filler.close()
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

    def _restore_replaced(self) -> None:
        """A run killed between moving an existing folder aside and renaming its new one into
        place left the old folder aside: put it back."""
        if self.replaced.is_dir() and not self.path.exists():
            os.replace(self.replaced, self.path)
            log.warning("Put %s back in place: a run was stopped while replacing it.", self.path)
        elif self.replaced.exists():
            shutil.rmtree(self.replaced, ignore_errors=True)

    def _finish_interrupted_publish(self) -> None:
        """A run killed between renaming the output and the last sidecar into place left the
        sidecars it had not renamed yet staged, complete and synced (:meth:`publish` stages them
        all first). If they describe the output, rename them now, as that run would have."""
        staged = {s: t for s in self.sidecars if (t := staging_path(s)).is_file()}
        if not (staged and self.path.is_file() and self.describes and self.describes(staged)):
            return
        for sidecar, tmp in staged.items():
            os.replace(tmp, sidecar)
        fsync_dir(self.path.parent)
        log.warning(
            "Finished publishing %s: an earlier run was stopped after renaming it into place "
            "and before %s; they were staged, and describe this very file.",
            self.path,
            ", ".join(str(s) for s in staged),
        )

    def _remove_leftovers(self) -> None:
        """The partial, a folder replaced by the one now in place, the sidecars' temporaries,
        and sidecars that describe no output (left by a run killed during publish, or by an
        older version that wrote them first)."""
        for path in [self.partial, *([self.replaced] if self.path.is_dir() else [])]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
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


#: The signals that stop a run: its own handlers (convert.py), or submitit's under SLURM.
_STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)


@contextmanager
def stops_deferred(done: str) -> Iterator[None]:
    """A few renames that must all happen or none: a stopping signal that arrives meanwhile
    takes effect (its handler runs) once they are done, and the log says ``done`` first.
    Python runs signal handlers in the main thread alone, which is where a job publishes;
    elsewhere this defers nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    failed = False
    previous = {s: signal.getsignal(s) for s in _STOPPING}
    for signum, handler in previous.items():
        if handler not in (signal.SIG_IGN, None):  # None: set outside Python, left alone
            signal.signal(signum, lambda n, _frame: arrived.append(n))
    try:
        yield
    except BaseException as e:  # a failing rename: rolled back by the block itself
        failed = True
        if arrived:
            log.error("Publishing failed as a stop came: %s", e)
        raise
    finally:
        for signum, handler in previous.items():
            if handler not in (signal.SIG_IGN, None):
                signal.signal(signum, handler)
        if arrived:
            if not failed:
                name = signal.Signals(arrived[0]).name
                log.warning("%s; then the stop (%s) took effect.", done, name)
            signal.raise_signal(arrived[0])


def staging_path(path: Path) -> Path:
    """The temporary name a sidecar ``path`` is written under before it is published."""
    return path.with_name(f".{path.name}.partial")


def write_atomic(path: Path, text: str) -> None:
    """Writes a small file so that readers see the old or the new contents, never a part."""
    tmp = _write_synced(staging_path(path), text)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_synced(path: Path, content: Content) -> Path:
    """Writes ``content`` (text, bytes, or a file to copy) to ``path`` and syncs it."""
    try:
        if isinstance(content, Path):
            shutil.copyfile(content, path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
