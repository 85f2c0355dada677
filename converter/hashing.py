"""The sha256 of files: of the output for its manifest, and of every source file, since DCP
itself keeps no checksums. Needs no torch, so that hashing the source can start first."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading
from pathlib import Path

# Hashed through a mapping of the file, a window at a time: reading into a buffer first would
# add a copy of every byte (~0.5 s per GB here, a third of the hashing), and a window keeps the
# pages this process maps, and so its resident memory, small. Large windows: the hashing thread
# needs the GIL between them, and while the main thread imports torch it may wait the 5 ms
# switch interval for it; 16 MiB take ~11 ms to hash.
_WINDOW = 16 << 20


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """The file's sha256; ``stop`` set ends the work early (the result is then meaningless)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start in range(0, size, _WINDOW):
            if stop is not None and stop.is_set():
                break
            # Reading a mapped page past the end of a file that shrank kills the process
            # (SIGBUS): check first, so that a source changed meanwhile is a clean error.
            if os.fstat(f.fileno()).st_size != size:
                raise OSError(errno.ESTALE, "the file changed while it was read", str(path))
            length = min(_WINDOW, size - start)
            with mmap.mmap(f.fileno(), length, offset=start, access=mmap.ACCESS_READ) as window:
                digest.update(window)
    return digest.hexdigest()


class SourceHasher:
    """The sha256 of a checkpoint's files, taken on a background thread.

    The job starts it as soon as it knows the step folder, before it imports torch, so that
    the hashing runs on another core while the main thread imports and plans; it then reads
    the files from the page cache that the conversion fills anyway (``hashlib`` and file reads
    release the GIL). Files found to be needed later are added with ``add``. ``result()``
    waits for the digests; ``cancel()`` stops after the block in hand, for a run that failed.
    """

    def __init__(self, paths: list[Path]) -> None:
        self._queue = list(paths)
        self._digests: dict[Path, str] = {}
        self._error: Exception | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sha256-sources", daemon=True)
        self._thread.start()

    def add(self, paths: list[Path]) -> None:
        """Queues the files of ``paths`` that are not hashed or queued yet."""
        with self._cond:
            self._queue += [p for p in paths if p not in self._digests and p not in self._queue]
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                path = self._queue[0]
            try:
                digest = sha256_file(path, self._stop)
            except Exception as e:  # an OSError, mostly; re-raised by result()
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            if self._stop.is_set():  # the digest of a file read in part
                return
            with self._cond:
                self._digests[path] = digest
                self._queue.pop(0)
                self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        self._thread.join()

    def result(self, paths: list[Path]) -> dict[Path, str]:
        """``path -> sha256`` for each of ``paths``, once hashed (queues any not yet known);
        raises the error that stopped the hashing."""
        self.add(paths)
        with self._cond:
            while self._error is None and not all(p in self._digests for p in paths):
                if self._stop.is_set():
                    raise RuntimeError("hashing was cancelled")
                self._cond.wait()
            if self._error is not None:
                raise self._error
            return {p: self._digests[p] for p in paths}
