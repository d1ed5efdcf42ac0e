"""Writing a file all at once or not at all."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path, mode="wb", encoding=None):
    """Yield a file to write `path` through, replacing `path` only when the block succeeds.

    The file is a temporary one in the same folder; at the end of the block it is flushed to
    disk (fsync) and renamed over `path` (os.replace is atomic on one file system). If the block
    raises, the temporary file is removed and `path` is untouched: a reader sees the old file
    or the new one, never half of one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
