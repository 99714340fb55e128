"""One exception type for problems the user can fix.

The CLI prints `HerdError` as a single line and exits with status 2; anything else is a bug and
keeps its traceback. Library callers catch it like any other exception.
"""


class HerdError(Exception):
    """Bad input (unknown model, broken file, shape mismatch, over-long prompt, ...)."""
