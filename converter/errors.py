"""The one exception type the converter raises for problems the user can fix."""


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
