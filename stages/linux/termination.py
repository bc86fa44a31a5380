"""The signals that ask a command to stop (SIGTERM, SIGHUP, and Ctrl-C's SIGINT), as an exception.

cow-collect and cow-apply have work to undo when stopped half way (a frozen tree to resume,
a half-made tree to kill): catch() makes these signals raise Terminated, so that the undoing
code on the way out runs, and the first one makes every later one ignored, so that the
undoing is not cut short in turn.
"""

import signal

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Terminated(Exception):
    pass


def _raise(signum, frame):
    dispose(signal.SIG_IGN)
    raise Terminated(f"terminated by signal {signum}")


def catch():
    """From now on each of SIGNALS raises Terminated (once)."""
    dispose(_raise)


def dispose(handler):
    """Every one of SIGNALS to handler (SIG_IGN once nothing is left to undo, SIG_DFL...)."""
    for sig in SIGNALS:
        signal.signal(sig, handler)
