"""A writer that never stops: appends to files, fsyncs, and journals what it committed.

`python -m tests.journal_writer DIR JOURNAL` appends 4 KiB blocks to DIR/f0..f19 in turn; after
each fsync returns it appends "name size" to JOURNAL (kept on another file system). A file's
content is `content(name, size)`, so any prefix of it can be checked. Used against frozen and
snapshotted file systems: everything journaled before a snapshot must be in it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

BLOCK = 4096
FILES = 20


def content(name: str, size: int) -> bytes:
    """The first `size` bytes of file `name`."""
    out = bytearray()
    block = 0
    while len(out) < size:
        out += hashlib.sha256(f"{name}:{block}".encode()).digest() * (BLOCK // 32)
        block += 1
    return bytes(out[:size])


def committed(journal: Path, upto: int | None = None) -> dict[str, int]:
    """Each file's committed size, from the first `upto` journal lines (all by default)."""
    sizes: dict[str, int] = {}
    for line in journal.read_text().splitlines()[:upto]:
        name, size = line.split()
        sizes[name] = int(size)
    return sizes


def main(directory: Path, journal_path: Path) -> None:
    sizes = dict.fromkeys((f"f{i}" for i in range(FILES)), 0)
    with journal_path.open("a") as journal:
        turn = 0
        while True:
            name = f"f{turn % FILES}"
            turn += 1
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                size = sizes[name]
                os.write(fd, content(name, size + BLOCK)[size:])
                os.fsync(fd)
            finally:
                os.close(fd)
            sizes[name] = size + BLOCK
            journal.write(f"{name} {sizes[name]}\n")
            journal.flush()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
