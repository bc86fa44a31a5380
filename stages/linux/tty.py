"""The caller's terminal: the terminal on the first of our stdin, stdout and stderr that is one.

cowtree's rule for terminals: an fd of the dumped tree on cow-collect's terminal is restored
onto cow-apply's terminal (the same one in a session on one machine; the user's new terminal
elsewhere). Any other terminal or pseudo-terminal is refused by name at collect time."""

import os


def caller_terminal():
    """(rdev, path) of our terminal, or None when none of fds 0, 1, 2 is a terminal."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.fstat(fd).st_rdev, os.ttyname(fd)
        except OSError:
            continue
    return None
