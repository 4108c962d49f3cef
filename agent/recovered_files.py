"""Files of a mounted recovery point: a directory listed, files and trees copied out.

Both work on a file system root (`MountedFileSystem.path`) and a path inside it given as
components. The path is resolved as if the root were `/`: a symbolic link on the way
(`/lib -> usr/lib`) is followed, but never out of the root (an absolute target starts again
at the root, `..` stops there), so a crafted link cannot reach the agent's own files. The
last component of a copied path is not followed: a link is copied as a link.

A copy writes only below a directory of the agent's `restore_dirs`, reached without following
links (`agent.restore_dirs`). It keeps contents, modes, owners, atime and mtime, symbolic
links, hard links within what is copied, and holes (only data extents are read and written,
found with SEEK_DATA/SEEK_HOLE). Device nodes, sockets and FIFOs are not created (a device
node from an untrusted file system would open the VM's own devices); they are reported as
skipped. Everything is copied into a hidden staging directory beside the destination first
and moved into place at the end: a copy that fails or is stopped leaves nothing behind, and
an existing name at the destination is refused (`RestoreTargetExists`) before any write.

These functions block, and what they read is served by the agent's event loop through FUSE:
run them in a thread, never on that loop. An OSError from a read (EIO) usually means a
damaged chunk: `MountedDisk.explain` turns it into the error worth reporting.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import heapq
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.restore_dirs import open_destination
from shared.errors import (
    InvalidArgument,
    NotFound,
    RestoreTargetExists,
    RestoreTargetFailed,
)

LIST_LIMIT = 1000  # entries in one listing page unless asked otherwise
MAX_LIST_LIMIT = 10_000
MAX_DEPTH = 256  # directories nested in a copied tree
MAX_LINK_HOPS = 40  # symbolic links followed resolving one path (Linux's own limit)
BLOCK = 1 << 20  # bytes per read and write of file data
_MOVE_AWAY = "Choose another destination or move it away first."

_libc = ctypes.CDLL(None, use_errno=True)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Progress = Callable[[int], None]
"""Told the bytes written after each block; raising from it stops the copy (nothing is left)."""


@dataclass(frozen=True)
class Entry:
    """One directory entry. `name` is decoded as the OS does (a name that is not UTF-8
    keeps its bytes as surrogates: `os.fsencode(name)` gives them back)."""

    name: str
    type: str  # file, dir, symlink, block, char, fifo, socket
    size: int
    mtime_ns: int
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    nlink: int
    target: str | None = None  # a symbolic link's target, as stored


@dataclass(frozen=True)
class Listing:
    path: str
    entries: tuple[Entry, ...]
    next_after: str | None  # more entries follow: list again with after=next_after


@dataclass
class CopyReport:
    files: int = 0  # regular files written
    directories: int = 0
    symlinks: int = 0
    hard_links: int = 0  # files linked to one already copied instead of written again
    bytes_written: int = 0
    skipped: list[str] = field(default_factory=list)  # special files, not created


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISBLK, "block"),
        (stat.S_ISCHR, "char"),
        (stat.S_ISFIFO, "fifo"),
    ):
        if test(mode):
            return name
    return "socket"


def _entry(dir_fd: int, name: str) -> Entry:
    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(info.st_mode) else None
    return Entry(
        name=name,
        type=_kind(info.st_mode),
        size=info.st_size,
        mtime_ns=info.st_mtime_ns,
        mode=stat.S_IMODE(info.st_mode),
        uid=info.st_uid,
        gid=info.st_gid,
        nlink=info.st_nlink,
        target=target,
    )


def _display(parts: Sequence[str]) -> str:
    return "/" + "/".join(parts)


def resolve(root: Path, parts: Sequence[str], follow_last: bool) -> tuple[int, str | None]:
    """(descriptor of the directory holding the path, its last component), the path resolved
    inside `root` as if `root` were `/`; last component None for the root itself.

    NotFound when a component is missing or not a directory. The caller closes the fd.
    """
    pending = [part for part in parts if part not in ("", ".")]
    pending.reverse()  # a stack: the next component at its end
    resolved: list[str] = []
    hops = 0
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        while pending:
            part = pending.pop()
            if part == "..":
                if resolved:
                    resolved.pop()
                    os.close(fd)
                    fd = _walk(root, resolved)
                continue
            last = not pending
            try:
                info = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise NotFound(kind="path", name=_display(parts)) from None
            if stat.S_ISLNK(info.st_mode) and (follow_last or not last):
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise NotFound(kind="path (too many symbolic links)", name=_display(parts))
                target = os.readlink(part, dir_fd=fd)
                if target.startswith("/"):
                    resolved = []
                    os.close(fd)
                    fd = _walk(root, resolved)
                pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
                continue
            if last:
                return fd, part
            if not stat.S_ISDIR(info.st_mode):
                raise NotFound(kind="directory", name=_display(parts))
            child = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = child
            resolved.append(part)
        if resolved:  # ended on a directory reached by `..` or a link: name it in its parent
            os.close(fd)
            fd = _walk(root, resolved[:-1])
            return fd, resolved[-1]
        return fd, None
    except BaseException:
        os.close(fd)
        raise


def _walk(root: Path, parts: list[str]) -> int:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            child = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- listing -----------------------------------------------------------------------------


def list_directory(
    root: Path, parts: Sequence[str], *, limit: int = LIST_LIMIT, after: str | None = None
) -> Listing:
    """The entries of a directory, sorted by name, at most `limit` of them after the name
    `after`; a path naming anything else lists that one entry."""
    if not 0 < limit <= MAX_LIST_LIMIT:
        raise InvalidArgument(detail=f"a listing holds 1 to {MAX_LIST_LIMIT} entries, not {limit}")
    parent, name = resolve(root, parts, follow_last=True)
    try:
        if name is not None:
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode):
                return Listing(_display(parts), (_entry(parent, name),), None)
            directory = os.open(name, _DIR, dir_fd=parent)
        else:
            directory = os.dup(parent)
    finally:
        os.close(parent)
    try:
        # The smallest names past `after`, holding `limit + 1` names however big the
        # directory: a hostile file system cannot make a listing use unbounded memory.
        with os.scandir(directory) as scan:
            names = heapq.nsmallest(
                limit + 1,
                (e.name for e in scan if after is None or e.name > after),
            )
        page = names[:limit]
        entries = []
        for entry_name in page:
            with contextlib.suppress(FileNotFoundError):
                entries.append(_entry(directory, entry_name))
        more = page[-1] if len(names) > limit else None
        return Listing(_display(parts), tuple(entries), more)
    finally:
        os.close(directory)


# --- copying out -------------------------------------------------------------------------


def copy_out(
    sources: Sequence[tuple[Path, Sequence[str]]],
    restore_dirs: Sequence[Path],
    destination: str,
    *,
    progress: Progress | None = None,
) -> CopyReport:
    """Copy each (file system root, path) into the directory `destination` under its own
    name (the root itself under the root's name), as `cp -a` would; what was written.

    PathNotAllowed when `destination` is outside `restore_dirs`; RestoreTargetExists when a
    name is already there; NotFound for a missing source. Nothing is left by a failure.
    """
    if not sources:
        raise InvalidArgument(detail="nothing to copy")
    try:
        target = open_destination(restore_dirs, destination)
    except OSError as exc:
        raise RestoreTargetFailed(path=destination, detail=exc.strerror) from exc
    try:
        return _copy_into(sources, target, destination, progress)
    finally:
        os.close(target)


def _copy_into(
    sources: Sequence[tuple[Path, Sequence[str]]],
    target: int,
    destination: str,
    progress: Progress | None,
) -> CopyReport:
    opened: list[tuple[int, str, str]] = []  # (parent fd, name in source, name at target)
    try:
        for root, parts in sources:
            parent, name = resolve(root, parts, follow_last=False)
            if name is None:  # the file system's root: copied under the mount's name
                opened.append((os.open(root.parent, _DIR), root.name, root.name))
                os.close(parent)
            else:
                opened.append((parent, name, name))
        names = [as_name for _, _, as_name in opened]
        for as_name in names:
            if names.count(as_name) > 1:
                raise InvalidArgument(detail=f"two sources would be copied as {as_name!r}")
            with contextlib.suppress(FileNotFoundError):
                os.stat(as_name, dir_fd=target, follow_symlinks=False)
                raise RestoreTargetExists(path=os.path.join(destination, as_name), fix=_MOVE_AWAY)
        staging = f".coffer-files-{secrets.token_hex(6)}"
        os.mkdir(staging, 0o700, dir_fd=target)
        try:
            stage = os.open(staging, _DIR, dir_fd=target)
            try:
                copier = _Copier(stage, progress)
                for parent, name, as_name in opened:
                    copier.copy(parent, name, stage, as_name, as_name, 0)
                for as_name in names:  # checked again: the copy took time
                    if as_name in copier.report.skipped:
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.stat(as_name, dir_fd=target, follow_symlinks=False)
                        raise RestoreTargetExists(
                            path=os.path.join(destination, as_name), fix=_MOVE_AWAY
                        )
                    os.rename(as_name, as_name, src_dir_fd=stage, dst_dir_fd=target)
            finally:
                os.close(stage)
        finally:
            shutil.rmtree(staging, dir_fd=target, ignore_errors=True)
        # Durable before reported done: one sync of the destination's file system rather
        # than an fsync per (small) file, nor a sync of every file system of the VM.
        if _libc.syncfs(target) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), destination)
        return copier.report
    finally:
        for parent, _, _ in opened:
            os.close(parent)


class _Copier:
    def __init__(self, stage: int, progress: Progress | None) -> None:
        self.report = CopyReport()
        self._stage = stage
        self._progress = progress
        self._linked: dict[tuple[int, int], str] = {}  # (device, inode) -> path in stage

    def copy(
        self, src_dir: int, name: str, dst_dir: int, as_name: str, staged: str, depth: int
    ) -> None:
        """Copy `name` of `src_dir` to `as_name` of `dst_dir` (at `staged` in the stage)."""
        info = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            if depth >= MAX_DEPTH:
                raise RestoreTargetFailed(
                    path=staged, detail=f"directories nest deeper than {MAX_DEPTH}"
                )
            os.mkdir(as_name, 0o700, dir_fd=dst_dir)
            source = os.open(name, _DIR, dir_fd=src_dir)
            try:
                made = os.open(as_name, _DIR, dir_fd=dst_dir)
                try:
                    for child in self._children(source):
                        self.copy(source, child, made, child, f"{staged}/{child}", depth + 1)
                    _keep_metadata(made, info)
                finally:
                    os.close(made)
            finally:
                os.close(source)
            self.report.directories += 1
        elif stat.S_ISREG(mode):
            key = (info.st_dev, info.st_ino)
            if info.st_nlink > 1 and key in self._linked:
                os.link(
                    self._linked[key],
                    as_name,
                    src_dir_fd=self._stage,
                    dst_dir_fd=dst_dir,
                    follow_symlinks=False,
                )
                self.report.hard_links += 1
                return
            self._file(src_dir, name, dst_dir, as_name, info)
            if info.st_nlink > 1:
                self._linked[key] = staged
            self.report.files += 1
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=src_dir), as_name, dir_fd=dst_dir)
            os.chown(as_name, info.st_uid, info.st_gid, dir_fd=dst_dir, follow_symlinks=False)
            os.utime(
                as_name,
                ns=(info.st_atime_ns, info.st_mtime_ns),
                dir_fd=dst_dir,
                follow_symlinks=False,
            )
            self.report.symlinks += 1
        else:
            self.report.skipped.append(staged)

    @staticmethod
    def _children(directory: int) -> Iterator[str]:
        with os.scandir(directory) as scan:
            names = [entry.name for entry in scan]
        return iter(sorted(names))

    def _file(
        self, src_dir: int, name: str, dst_dir: int, as_name: str, info: os.stat_result
    ) -> None:
        source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            made = os.open(
                as_name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dst_dir,
            )
            try:
                size = os.fstat(source).st_size
                for start, end in _data_extents(source, size):
                    self._copy_range(source, made, start, end)
                os.ftruncate(made, size)  # the holes, and a hole at the end
                _keep_metadata(made, info)
            finally:
                os.close(made)
        finally:
            os.close(source)

    def _copy_range(self, source: int, made: int, start: int, end: int) -> None:
        offset = start
        while offset < end:
            data = os.pread(source, min(BLOCK, end - offset), offset)
            if not data:
                return  # the file is shorter than it said
            written = 0
            while written < len(data):
                written += os.pwrite(made, memoryview(data)[written:], offset + written)
            offset += len(data)
            self.report.bytes_written += len(data)
            if self._progress is not None:
                self._progress(len(data))


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of data in the file; all of it without hole support."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from here on
                return
            if exc.errno == errno.EINVAL:  # no hole support: all data
                yield offset, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= end:
            return
        yield start, end
        offset = end


def _keep_metadata(fd: int, info: os.stat_result) -> None:
    """Owner, then mode (a chown clears setuid bits), then times (the others change ctime
    and, for a directory filled meanwhile, mtime)."""
    os.fchown(fd, info.st_uid, info.st_gid)
    os.fchmod(fd, stat.S_IMODE(info.st_mode))
    os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))
