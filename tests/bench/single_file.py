"""One small file back from the latest snapshot of the image: `coffer files get` against
`restic mount` and `borg mount`, on the same data, in the same run.

The file is a small text file of the image's file system as the last backup saw it, chosen
the same way in every run (`pick_small_file`). Each tool starts from a dropped page cache
and gets that one file to a destination directory:

- Coffer: `coffer files get bench-vm --rp RP --disk root PATH --to DIR`. The agent opens the
  recovery point as a lazily fetched disk (FUSE), attaches it read-only, mounts its ext4
  without journal replay and copies the file: what an operator types, all of it measured;
- restic and borg back the image up as one file. Reaching a file inside it is what an
  operator of those tools would do: `restic mount` / `borg mount` the repository (FUSE),
  attach the image in it read-only (loop), mount its ext4 read-only without journal replay
  (`noload`), copy the file.

Figures: seconds from the first command's start to the file written at its destination (and
to everything taken down again), and the bytes read from the repository for it, measured the
same way for every tool: `read_bytes` of /proc/PID/io (reads that reached the storage, the
cache being dropped) of the process that reads the repository (Coffer's controller, which
reads the datastore; restic's and borg's FUSE servers). Coffer's own count (the job's stored
bytes fetched) is shown beside it. The target for Coffer: under 2 s and under 5% of the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.bench.image import mounted
from tests.bench.measure import StepFailed, StepResult

STEP = "file-get"
SMALL_MIN = 2 << 10  # the file picked is a text file of 2 to 64 KiB
SMALL_MAX = 64 << 10
POLL_S = 0.005
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".go", ".conf", ".log")


@dataclass(frozen=True)
class SmallFile:
    path: str  # inside the image's file system, from its root ("/prose/...")
    size: int
    sha256: str


def pick_small_file(image: Path) -> SmallFile:
    """The first (by path) text file of 2-64 KiB in the image's file system."""
    with mounted(image, readonly=True, options="noload") as root:
        for directory, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(directory) / name
                size = path.lstat().st_size
                if (
                    path.is_file()
                    and not path.is_symlink()
                    and path.suffix in TEXT_SUFFIXES
                    and SMALL_MIN <= size <= SMALL_MAX
                ):
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    return SmallFile("/" + str(path.relative_to(root)), size, digest)
    raise StepFailed(f"no text file of {SMALL_MIN}-{SMALL_MAX} bytes in {image}")


def read_bytes(pid: int) -> int:
    """Bytes `pid` has read from storage so far (/proc/PID/io `read_bytes`)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def wait_for_file(path: Path, done: Callable[[], bool], timeout_s: float) -> float:
    """Poll until `path` exists; the perf_counter at which it was seen. StepFailed when
    `done` says the writer ended without it, or after `timeout_s`."""
    deadline = time.perf_counter() + timeout_s
    while True:
        now = time.perf_counter()
        if path.exists():
            return now
        if done() and not path.exists():
            raise StepFailed(f"{path} was not written")
        if now > deadline:
            raise StepFailed(f"{path} not written after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def result(
    tool: str,
    image_bytes: int,
    first_s: float,
    total_s: float,
    fetched: int,
    file: SmallFile,
    written: Path,
    **detail: object,
) -> StepResult:
    """The step's figures; the file checked against the source."""
    got = hashlib.sha256(written.read_bytes()).hexdigest()
    step = StepResult(
        tool=tool,
        step=STEP,
        image_bytes=image_bytes,
        wall_s=first_s,
        cpu_s=0.0,
        peak_rss=0,
        repo_bytes=0,
        added_bytes=0,
        ok=got == file.sha256,
        error="" if got == file.sha256 else f"{written} differs from the source file",
        detail={
            "file": file.path,
            "file_bytes": file.size,
            "total_s": total_s,
            "read_from_repository": fetched,
            **detail,
        },
    )
    return step


@contextlib.contextmanager
def _served(argv: list[str], env: Mapping[str, str], mountpoint: Path, log: Path) -> Iterator[int]:
    """A FUSE server (`restic mount`, `borg mount -f`) on `mountpoint`; its PID. Unmounted
    and stopped on exit."""
    with log.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv, env=dict(env), stdout=out, stderr=out, stdin=subprocess.DEVNULL
        )
    try:
        yield proc.pid
    finally:
        for attempt in range(40):
            if not os.path.ismount(mountpoint):
                break
            done = subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
            if done.returncode == 0:
                break
            time.sleep(0.25 if attempt < 39 else 0)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


def through_mount(
    tool: str,
    argv: list[str],
    env: Mapping[str, str],
    image_in: Callable[[Path], Path],
    file: SmallFile,
    image_bytes: int,
    destination: Path,
    log: Path,
    timeout_s: float,
) -> StepResult:
    """A peer's way to one file: serve the repository over FUSE (`argv` + mountpoint), attach
    the image in it read-only, mount its file system read-only without journal replay, copy
    the file to `destination`."""
    destination.mkdir(parents=True, exist_ok=True)
    target = destination / Path(file.path).name
    mountpoint = Path(tempfile.mkdtemp(prefix=f"bench-{tool}-mount-"))
    try:
        start = time.perf_counter()
        with _served([*argv, str(mountpoint)], env, mountpoint, log) as pid:
            image = image_in(mountpoint)
            wait_for_file(image, lambda: False, timeout_s)
            with mounted(image, readonly=True, options="noload") as root:
                shutil.copy2(root / file.path.lstrip("/"), target)
                first = time.perf_counter()
                fetched = read_bytes(pid)
        total = time.perf_counter()
    finally:
        with contextlib.suppress(OSError):
            mountpoint.rmdir()
    return result(tool, image_bytes, first - start, total - start, fetched, file, target)
