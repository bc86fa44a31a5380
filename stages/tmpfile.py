"""unnamed_file: a temporary file that has no name (O_TMPFILE), where tempfile would put it.

Not tempfile.TemporaryFile: importing tempfile (shutil, random, bz2, lzma...) costs cow-plan and
cow-apply ~5 ms of every start.  tempfile is still what runs where O_TMPFILE does not work.
"""

import os


def unnamed_file(dir=None):
    """fd (read-write, 0600, close-on-exec) of a new file without a name, in dir or else in
    the first of $TMPDIR, $TEMP, $TMP, /tmp.  Gone when its last fd is closed."""
    where = dir or next((os.environ[v] for v in ("TMPDIR", "TEMP", "TMP") if os.environ.get(v)), "/tmp")
    try:
        return os.open(where, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
    except OSError:  # a file system without O_TMPFILE, or no such dir: tempfile chooses
        import tempfile

        fd, path = tempfile.mkstemp(prefix="cowtree-", dir=dir)
        os.unlink(path)
        return fd
