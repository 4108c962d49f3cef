"""A file tree with everything file recovery must keep, and its manifest to compare copies.

`populate` writes regular files, a nested tree, symbolic links (relative, absolute, dangling,
to a directory), a sparse file, a large file, hard links, a FIFO, a setuid file, a name
that is not UTF-8, other owners and modes, and fixed times. `manifest` records what a user
would check of a tree: type, mode, owner, times, size, content digest, link target, which
names share an inode, without changing atimes as it reads (O_NOATIME).
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import time
from pathlib import Path

MiB = 1 << 20
MTIME_NS = 1_614_834_367_123_456_789  # 2021-03-04, with nanoseconds
LARGE = 24 * MiB
SPARSE = 64 * MiB
ODD_NAME = os.fsdecode(b"caf\xe9 menu.txt")  # Latin-1, not UTF-8, with a space

Record = tuple[object, ...]


def populate(root: Path) -> None:
    rng = random.Random(2024)
    # Recent atimes, later than the mtimes: relatime then leaves them alone when read.
    atime_ns = (time.time_ns() - 3600 * 10**9) // 10**9 * 10**9 + 987_654_321

    def write(rel: str, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.chown(path, *owner)
        os.chmod(path, mode)

    write("etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")
    write("etc/secret.conf", b"token = 42\n", 0o600)
    write("home/alice/notes.txt", b"remember the milk\n" * 100, 0o640, (1000, 1000))
    write("home/alice/bin/tool", b"#!/bin/sh\necho tool\n", 0o4755)
    write("home/alice/shared", b"group stuff\n", 0o2770, (1000, 100))
    for i in range(30):
        write(f"tree/many/file{i:02d}.txt", f"file {i}\n".encode() * (i + 1))
    write("tree/a/b/c/deep.txt", b"deep down\n")
    write(f"tree/{ODD_NAME}", b"soup of the day\n")
    write("tree/hard1", rng.randbytes(10_000), 0o600, (1000, 1000))
    os.link(root / "tree/hard1", root / "tree/a/hard2")
    write("large.bin", rng.randbytes(LARGE))
    marker = b"MARKER-OF-THE-SMALL-FILE" + rng.randbytes(4000)
    write("small.txt", marker)
    sparse = root / "sparse.bin"
    with sparse.open("wb") as f:
        f.truncate(SPARSE)
        f.seek(0)
        f.write(b"head" * 1024)
        f.seek(SPARSE // 2)
        f.write(rng.randbytes(8192))
        f.seek(SPARSE - 1)
        f.write(b"!")
    links = root / "links"
    links.mkdir()
    os.symlink("../etc/hosts", links / "rel")
    os.symlink("/etc/passwd", links / "abs")  # outside the tree when followed on the host
    os.symlink("nowhere", links / "dangling")
    os.symlink("../tree", links / "dir")
    os.lchown(links / "rel", 1000, 1000)
    os.mkfifo(root / "fifo")
    (root / "empty-dir").mkdir(mode=0o750)
    # Times last, deepest first, so that writing a child does not move its parent's mtime.
    paths = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in [*paths, root]:
        os.utime(path, ns=(atime_ns, MTIME_NS), follow_symlinks=False)


def small_file_marker(root: Path) -> bytes:
    """The first bytes of small.txt: unique on the disk, so its chunk can be found."""
    return (root / "small.txt").read_bytes()[:64]


def _read(dir_fd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME, dir_fd=dir_fd)
    digest = hashlib.sha256()
    try:
        while block := os.read(fd, MiB):
            digest.update(block)
    finally:
        os.close(fd)
    return digest.hexdigest()


def manifest(root: Path) -> dict[str, Record]:
    """path -> (type, mode, uid, gid, mtime_ns, atime_ns, size, sha256 or link target,
    hard-link group) for everything below `root`.

    Each entry is recorded before it is read, but reading a symbolic link whose atime is
    older than its ctime (as after any utime) moves its atime (relatime; readlink has no
    O_NOATIME): take a tree's manifest twice to compare what a later reader saw."""
    found: dict[str, Record] = {}
    inodes: dict[int, str] = {}

    def walk(dir_fd: int, prefix: str) -> None:
        with os.scandir(dir_fd) as scan:
            names = sorted(entry.name for entry in scan)
        for name in names:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            rel = f"{prefix}{name}"
            mode = info.st_mode
            content: str | None = None
            group: str | None = None
            if stat.S_ISREG(mode):
                content = _read(dir_fd, name)
                if info.st_nlink > 1:
                    group = inodes.setdefault(info.st_ino, rel)
            elif stat.S_ISLNK(mode):
                content = os.readlink(name, dir_fd=dir_fd)
            size = info.st_size if not stat.S_ISDIR(mode) else 0
            found[rel] = (
                stat.S_IFMT(mode),
                stat.S_IMODE(mode),
                info.st_uid,
                info.st_gid,
                info.st_mtime_ns,
                info.st_atime_ns,
                size,
                content,
                group,
            )
            if stat.S_ISDIR(mode):
                child = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOATIME, dir_fd=dir_fd
                )
                try:
                    walk(child, f"{rel}/")
                finally:
                    os.close(child)

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
    try:
        walk(top, "")
    finally:
        os.close(top)
    return found


def allocated(path: Path) -> int:
    """Bytes the file takes on disk."""
    return os.stat(path).st_blocks * 512
