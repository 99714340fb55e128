"""One exception type for problems the user can fix.

The CLI prints `HerdError` as a single line and exits with status 2; anything else is a bug and
keeps its traceback. Library callers catch it like any other exception.
"""

import argparse
from typing import NoReturn


class HerdError(Exception):
    """Bad input (unknown model, broken file, shape mismatch, over-long prompt, ...)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as one line naming the problem (and where the
    usage is), exit status 2, like every other bad input; argparse's own prints the whole usage
    block first, which buries the one line that matters. Subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
