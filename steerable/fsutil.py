"""Atomic file writes (a reader never sees a half-written artifact) and reads that never block on a FIFO."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from steerable.errors import ArtifactError, SteerableError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    The result has the mode a plain `open(path, "w")` gives (0666 less the umask), even when the writer
    in the block replaced the temporary file with one of its own (safetensors' save_file makes it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: its 0600 would stick to the result; O_EXCL with mode 0666 honours the umask like open()
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the umask made of 0666, read without changing it
    try:
        yield Path(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def default_modes(where: str | os.PathLike) -> tuple[int, int]:
    """(file mode, directory mode) that open() and mkdir() give in directory `where` under the current umask,
    found by making and removing a probe of each (the umask is never changed, not even for a moment)."""
    probe = Path(where) / f".mode-probe.{secrets.token_hex(6)}"
    os.mkdir(probe, 0o777)
    try:
        dir_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.rmdir(probe)
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        file_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.unlink(probe)
    return file_mode, dir_mode


def apply_umask(root: str | os.PathLike) -> None:
    """Give `root` and, for a directory, everything under it the modes a plain open()/mkdir() would have given
    (writers such as safetensors' save_file and tempfile.mkdtemp leave 0600 / 0700). For a directory written
    whole and then renamed into place: call it on the temporary directory before the rename."""
    root = Path(root)
    file_mode, dir_mode = default_modes(root.parent)
    if not root.is_dir():
        os.chmod(root, file_mode)
        return
    os.chmod(root, dir_mode)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(parent, name), dir_mode)
        for name in files:
            if not os.path.islink(os.path.join(parent, name)):
                os.chmod(os.path.join(parent, name), file_mode)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_regular(path: str | os.PathLike, what: str = "file",
                  error: type[SteerableError] = ArtifactError) -> Path:
    """`path` if it names a regular file (after symlinks); else `error` naming it. Nothing is opened, so a
    FIFO or a device never blocks the caller."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"no such {what}: {path}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise error(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: not a regular file (a {_kind(mode)}); a {what} must be a regular file")
    return path


def open_regular(path: str | os.PathLike, what: str = "file",
                 error: type[SteerableError] = ArtifactError) -> BinaryIO:
    """Open a regular file for binary reading; a FIFO, device, socket or directory is refused, without
    blocking and without a race: the file is opened non-blocking and checked on its descriptor."""
    check_regular(path, what, error)  # the clear "no such file" message
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped since check_regular
            raise error(f"{path}: not a regular file (a {_kind(mode)}); a {what} must be a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
