#!/usr/bin/python3
"""The guest's application: numbered journal records, each written and fsynced before the next.

`coffer-journal-app JOURNAL...` appends record N (`record(N)`: the number and a digest of it) to
every JOURNAL in turn, fsyncs each, then goes on with N+1, a few dozen records a second. A record
whose line is complete in a journal was committed there; after a restore, every record up to the
last one visible before the backup was asked for must be present, in order, with its digest
(`check`). It starts after the last complete record it finds, so it resumes after a reboot.
Installed in the guest image as /usr/local/bin/coffer-journal-app (stdlib only).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

PAUSE = 0.02  # seconds between records: a steady writer that leaves the emulated CPU alone


def record(n: int) -> str:
    return f"{n} {hashlib.sha256(str(n).encode()).hexdigest()[:16]}\n"


def check(text: str) -> int:
    """The number of complete, valid records from 1 on; ValueError at the first bad one."""
    count = 0
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # a record torn by a crash is not committed
        if line != record(count + 1):
            raise ValueError(f"record {count + 1} is {line!r}")
        count += 1
    return count


def main(paths: list[Path]) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    # After a restart the journals may differ by the record that was being written.
    counts = [check(p.read_text()) if p.exists() else 0 for p in paths]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for p in paths]
    n = min(counts)
    while True:
        n += 1
        for fd, count in zip(fds, counts, strict=True):
            if count < n:
                os.write(fd, record(n).encode())
                os.fsync(fd)
        time.sleep(PAUSE)


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]])
