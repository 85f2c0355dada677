"""The one exception type the converter raises for problems the user can fix, and the
paragraphs it says for errors that are not the data's fault."""

import errno
from pathlib import Path


class ConversionError(Exception):
    """Bad input or environment: reported as one paragraph, without a traceback.

    The message names the file or key at fault and says what to do about it.
    """


def environment_error(what: str, e: BaseException) -> ConversionError:
    """An error that the Python environment caused, named as such, so that nobody re-copies a
    checkpoint for a module missing from this environment."""
    return ConversionError(
        f"{what} failed because of this Python environment, not the data "
        f"({type(e).__name__}: {e}). Install titan2tune's declared dependencies into the "
        "environment that runs the converter (pip install -e .), then run again."
    )


def n_tensors(n: int) -> str:
    """'1 tensor', '3 tensors': for messages."""
    return f"{n} tensor{'s' * (n != 1)}"


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
