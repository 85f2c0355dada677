"""Where a checkpoint lies: the small interface through which everything reads a source.

A source is a folder of files addressed by string paths: a local folder, or an object store
reached through fsspec (``converter.sources.remote``). Nothing above this module opens a source
file or holds a ``Path`` to one, so a conversion reads S3 the way it reads a local disk: by
byte ranges, into buffers the caller owns.

Needs no torch: the job finds the step folder before it imports torch.
"""

from __future__ import annotations

import errno
import mmap
import os
import posixpath
import re
import stat
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from converter.errors import ConversionError

#: How long one request to an object store is retried while it fails transiently
#: (``experiment.storage_retry_s``).
STORAGE_RETRY_S = 60.0
# fsspec's names for the local file system: such a URL is read, and written, as a plain path.
LOCAL_SCHEMES = ("file://", "local://")


def local_part(location: str) -> str | None:
    """``location`` as a plain path if it is one (or a local URL), else None (a store's URL)."""
    for scheme in LOCAL_SCHEMES:
        if location.startswith(scheme):
            return location.removeprefix(scheme)
    return None if "://" in location else location


@dataclass(frozen=True)
class FileInfo:
    """One entry of a folder. ``version`` identifies the file's contents as cheaply as the
    storage allows: the modification time (ns) of a local file, the ETag of an object."""

    name: str
    is_dir: bool
    size: int = 0
    version: str = ""


class Storage(ABC):
    """Read access to one source tree. Paths are strings; ``root`` is the folder asked for."""

    root: str
    #: What ``FileInfo.version`` holds, for the manifest ("mtime_ns", "etag").
    version_kind: str
    #: Whether reads cost a request each (a remote store), which the reader batches.
    remote: bool = False

    def join(self, folder: str, *names: str) -> str:
        return posixpath.join(folder, *names)

    @staticmethod
    def name(path: str) -> str:
        return posixpath.basename(path.rstrip("/"))

    @staticmethod
    def parent(path: str) -> str:
        return posixpath.dirname(path.rstrip("/"))

    def display(self, path: str) -> str:
        """``path`` as a user would type it (a URL for a remote store)."""
        return path

    @abstractmethod
    def info(self, path: str) -> FileInfo | None:
        """The file or folder at ``path``, or None if there is none."""

    @abstractmethod
    def listdir(self, folder: str) -> list[FileInfo]:
        """The entries of ``folder``, sorted by name."""

    @abstractmethod
    def read_into(self, path: str, offset: int, into: memoryview) -> int:
        """Reads up to ``len(into)`` bytes of ``path`` from ``offset`` into ``into``; returns how
        many it read (fewer only at the end of the file)."""

    def map(self, path: str, offset: int, length: int) -> memoryview | None:
        """``length`` bytes of ``path`` from ``offset`` without a copy (a mapping of the page
        cache), or None where the storage cannot map (a remote store: then read_into)."""
        return None

    def read_batch(self, reads: Sequence[tuple[str, int, memoryview]]) -> list[int]:
        """Several ``read_into`` at once, ``(path, offset, into)`` each; returns what each
        read. A remote store has them in flight together, so a window whose rows lie in
        several chunks costs one round trip, not one per chunk."""
        return [self.read_into(path, offset, into) for path, offset, into in reads]

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        if length is None:
            info = self.info(path)
            length = max(0, (info.size if info else 0) - offset)
        buffer = bytearray(length)
        got = self.read_into(path, offset, memoryview(buffer))
        return bytes(buffer[:got])

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the manifest says of this storage: what identifies its files and, for a
        remote store, what was downloaded."""

    def abort(self) -> None:  # noqa: B027 (a local read is never waited on for long)
        """The run is interrupted: requests not yet sent are not, and none is retried, so
        that the reads under way end within one request's timeout."""

    def close(self) -> None:  # noqa: B027 (nothing to release, locally)
        """Releases connections or caches."""


class LocalStorage(Storage):
    """A folder on a local or mounted file system."""

    version_kind = "mtime_ns"

    def __init__(self, root: str) -> None:
        self.root = root

    def info(self, path: str) -> FileInfo | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise read_error(path, e) from e
        is_dir = os.path.isdir(path)
        return FileInfo(self.name(path), is_dir, 0 if is_dir else st.st_size, str(st.st_mtime_ns))

    def listdir(self, folder: str) -> list[FileInfo]:
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise read_error(folder, e) from e
        return [i for n in names if (i := self.info(os.path.join(folder, n))) is not None]

    def map(self, path: str, offset: int, length: int) -> memoryview | None:
        """A read-only mapping, populated at once: one call instead of a page fault per 4 KiB.
        The file is checked to be long enough after mapping it: reading a mapped page past
        the end of a file that shrank meanwhile would kill the process (SIGBUS)."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        fd = _open_file(path)
        try:
            mapping = mmap.mmap(
                fd,
                length + offset - start,
                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                prot=mmap.PROT_READ,
                offset=start,
            )
            if os.fstat(fd).st_size < offset + length:
                mapping.close()
                raise OSError(errno.ESTALE, "the file shrank while it was read", path)
        except OSError as e:
            raise read_error(path, e) from e
        finally:
            os.close(fd)
        return memoryview(mapping)[offset - start :]

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "files_identified_by": "each file's size and mtime_ns"}

    def read_into(self, path: str, offset: int, into: memoryview) -> int:
        view = into.cast("B") if into.format != "B" else into
        fd = _open_file(path)
        done = 0
        try:
            while done < len(view):
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    break
                done += got
        except OSError as e:
            raise read_error(path, e) from e
        finally:
            os.close(fd)
        return done


def _open_file(path: str) -> int:
    """A descriptor of the regular file ``path``. Opened without blocking: a FIFO in its place
    would otherwise wait forever for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise read_error(path, e) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConversionError(
            f"{path} is not a regular file (a FIFO, a socket or a device), where a DCP save "
            "writes one. Copy the step folder again from where the save wrote it."
        )
    return fd


def read_error(path: str, e: OSError) -> ConversionError:
    """An I/O error while reading a source: the storage failed, which says nothing of the data."""
    return ConversionError(
        f"Cannot read {path}: {e.strerror or e} (errno {e.errno}). The storage failed while "
        "reading, which says nothing of the data: check the file system, then run again."
    )


# Option names that carry a secret (s3fs's key/secret/token, client_kwargs'
# aws_secret_access_key, Azure's account_key, sas_token, connection_string, ...).
_SECRET = re.compile(r"key|secret|token|password|passwd|credential|sas|connection_string", re.I)


def redacted(options: Any) -> Any:
    """``experiment.storage_options`` without its secrets, for the manifest: the values of
    keys that name a secret, and the user:password of a URL, are replaced by ``<redacted>``."""
    if isinstance(options, dict):
        return {
            k: "<redacted>" if _SECRET.search(str(k)) else redacted(v) for k, v in options.items()
        }
    if isinstance(options, list | tuple):
        return [redacted(v) for v in options]
    if isinstance(options, str) and "@" in options and "://" in options:
        parts = urllib.parse.urlsplit(options)
        if parts.password or parts.username:
            host = parts.hostname or ""
            netloc = f"<redacted>@{host}" + (f":{parts.port}" if parts.port else "")
            return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return options
