"""One exception type for problems the user can fix.

The CLI prints `HerdError` as a single line and exits with status 2; anything else is a bug and
keeps its traceback. Library callers catch it like any other exception.
"""

import argparse
import os
import signal
import sys
import time
from typing import NoReturn


class HerdError(Exception):
    """Bad input (unknown model, broken file, shape mismatch, over-long prompt, ...)."""


class HerdWarning(UserWarning):
    """Something the user should know that does not stop the command (a tokenizer left behind, a
    compile skipped). The CLI prints it as one `herd: warning: ...` line; a library caller gets a
    plain warning (a UserWarning, so the usual filters apply)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad command line reported as one line naming the problem (and where the
    usage is), exit status 2, like every other bad input; argparse's own prints the whole usage
    block first, which buries the one line that matters. Subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{self.prog}: error: {message} (see {self.prog} --help)")  # once per torchrun job
        sys.exit(2)


# How long a rank other than 0 waits for the launcher to end it before printing its own error line.
# Rank 0 meets the same bad option or config a moment apart from the others (every rank parses the
# same command line and files), prints it and exits; torchrun then stops the rest within its
# --monitor-interval (0.1 s by default). Ten seconds covers ranks that start unevenly on a busy
# machine, and an error only one rank meets (its GPU, its node's files) is still reported, just later.
OTHER_RANK_GRACE_S = 10.0


def _rank() -> int:
    """This process's rank in a torchrun (or similar) job: RANK, else LOCAL_RANK; 0 when alone."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    except ValueError:  # not set by a launcher we know: speak
        return 0


def print_error(line: str) -> None:
    """Print a one-line error on stderr, once per job rather than once per rank.

    Under torchrun every rank parses the same command line and config, so a bad key used to print
    the same line from every rank. Rank 0 prints it; any other rank stays quiet and waits for the
    launcher, which stops the remaining workers once one has failed, and leaves with status 2 (the
    CLI's status for bad input) when it does, not the -15 of a plain SIGTERM. If it is still running
    after OTHER_RANK_GRACE_S, rank 0 has not failed the same way, so the error is this rank's own:
    it prints the line, marked with its rank, rather than lose it."""
    rank = _rank()
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
        return

    def _stopped(signum, frame):  # the launcher's SIGTERM (or SIGINT): same status as the error
        sys.exit(2)

    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        time.sleep(OTHER_RANK_GRACE_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"[rank {rank}] {line}", file=sys.stderr, flush=True)
