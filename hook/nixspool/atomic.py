"""The one way nixspool writes a file whole: a new file of its own beside it
(mkstemp: O_EXCL, mode 0600 until told otherwise), mode and owner set while it is
still private, fsync'ed, then renamed over the old one (or linked, where an old one
must not be replaced), and the directory fsync'ed. A reader sees the old file or
the new one, never half of one; a crash leaves no half-written key, unit or
metrics file under the real name."""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_file(
    path: str,
    text: str,
    mode: int,
    *,
    owner: tuple[int, int] | None = None,
    replace: bool = True,
) -> None:
    """Write `text` to `path` as described above. `replace=False`: FileExistsError if
    `path` exists (the check and the write are one step: no race). OSError as the
    directory answers."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists, atomically
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename is an entry of the directory: until that is on disk too, a power
    # cut can leave the old file (or none) under the name.
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
