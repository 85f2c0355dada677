"""The one exception type the converter raises for problems the user can fix."""


class ConversionError(Exception):
    """Bad input or environment: reported as one paragraph, without a traceback.

    The message names the file or key at fault and says what to do about it.
    """
