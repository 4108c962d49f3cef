"""Where the agent may write what it restores: below its `restore_dirs`, reached without links.

A target is judged on the path as written (absolute, no `..`) against the configured
directories; the writer then walks it from the restore directory one component at a time
with O_NOFOLLOW, so nothing a user of the VM plants in a restore directory (a symbolic link
to /etc, say) can send the write elsewhere. Whole-disk restores and file recovery both go
through here: the controller cannot make an agent write anywhere else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from shared.errors import PathNotAllowed

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _confine(
    restore_dirs: Sequence[Path], target: str, strictly_below: bool
) -> tuple[Path, tuple[str, ...]]:
    path = Path(target)
    allowed = ", ".join(str(d) for d in restore_dirs) or "none configured"
    if not path.is_absolute() or ".." in path.parts:
        raise PathNotAllowed(path=target, allowed=allowed)
    for directory in restore_dirs:
        if path.is_relative_to(directory) and not (strictly_below and path == directory):
            return directory, path.relative_to(directory).parts
    raise PathNotAllowed(path=target, allowed=allowed)


def allowed_target(restore_dirs: Sequence[Path], target: str) -> tuple[Path, tuple[str, ...]]:
    """The restore directory `target` lies strictly below and its path under it;
    PathNotAllowed otherwise."""
    return _confine(restore_dirs, target, strictly_below=True)


def check_destination(restore_dirs: Sequence[Path], target: str) -> None:
    """PathNotAllowed unless the directory `target` is a restore directory or lies below one
    (judged on the path as written; `open_destination` then walks it without links)."""
    _confine(restore_dirs, target, strictly_below=False)


def open_parent(root: Path, parts: tuple[str, ...]) -> int:
    """A descriptor of the directory holding `root/parts`, reached without following links."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_destination(restore_dirs: Sequence[Path], target: str) -> int:
    """A descriptor of the directory `target` (a restore directory or one below it), made
    where missing (mode 0700) and reached without following links; PathNotAllowed when it
    lies outside `restore_dirs`, OSError when a component is not a directory."""
    root, parts = _confine(restore_dirs, target, strictly_below=False)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o700, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd
