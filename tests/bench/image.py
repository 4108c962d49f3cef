"""Benchmark disk images: a seeded ext4 disk of realistic files, and the churn applied to it.

The base image is a sparse raw file holding one ext4 file system (no partition table), filled
by loop-mounting it and writing files (one pass of writes; `mkfs.ext4 -d` would need a staging
copy). The seed decides the files, their contents and the blocks they land in (see
`_allocate_now`), so two builds differ only in metadata: the journal (commit timing), inode
times, and the random inode generations in directory-block checksums (about 5,000 of the
65,536 blocks of a 256 MiB image, most of them in the journal). Free space is left as holes,
as on a new disk.

Churn, each applied to a copy of the base (`copy_image`):

- `churn_scatter`: a fraction of the image's 4 KiB blocks overwritten with random bytes at
  scattered block-aligned offsets, on the raw image (the file system is not told; it may no
  longer mount cleanly, which a block-level backup must not care about);
- `churn_clustered`: the same number of bytes in runs (256 KiB by default) at random
  block-aligned, non-overlapping offsets;
- `edit_files`: what programs do inside the file system: appends, in-place edits, rewritten
  files, new files and deleted files, about a fraction of the file data in all.

Everything here needs root (losetup, mount) except `build_sparse_image`, `copy_image` and the
raw churns. `mounted` always unmounts and detaches its loop device, and checks that none is
left on the image.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.content import KINDS, TEXT_KINDS, FileGen, kind_of

BLOCK = 4096
GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Mix:
    """Shares of the file data by kind (normalised when used)."""

    prose: float = 0.12
    code: float = 0.14
    log: float = 0.09
    binary: float = 0.30
    random: float = 0.20
    zeros: float = 0.15

    def budgets(self, total: int) -> dict[str, int]:
        shares = {kind: float(getattr(self, kind)) for kind in KINDS}
        whole = sum(shares.values())
        return {kind: int(total * share / whole) for kind, share in shares.items()}


@dataclass
class ImageInfo:
    """What `build_image` wrote."""

    path: Path
    size_bytes: int
    fs_bytes: int  # capacity of the file system (statvfs)
    used_bytes: int  # allocated in the file system, metadata included (statvfs)
    files: int
    bytes_by_kind: dict[str, int]


@dataclass
class EditSummary:
    """What `edit_files` changed: bytes and file counts by action."""

    data_bytes: int  # file data in the file system before the edits
    budget: int
    bytes: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


# -- loop devices and mounts ---------------------------------------------------------------


def loop_devices_for(image_path: str | Path) -> list[str]:
    """Loop devices currently backed by `image_path`."""
    out = _run(["losetup", "--list", "--noheadings", "--output", "NAME", "--associated",
                str(Path(image_path).resolve())]).stdout  # fmt: skip
    return [line.strip() for line in out.splitlines() if line.strip()]


def _umount(target: Path) -> None:
    # A just-closed file can keep the mount busy for a moment (e.g. a udev probe).
    for attempt in range(20):
        done = subprocess.run(["umount", str(target)], capture_output=True, text=True)
        if done.returncode == 0:
            return
        if attempt == 19:
            raise RuntimeError(f"umount {target}: {done.stderr.strip()}")
        subprocess.run(["sleep", "0.25"], check=False)


@contextlib.contextmanager
def mounted(
    image_path: str | Path,
    *,
    readonly: bool = False,
    fstype: str | None = None,
    options: str | None = None,
) -> Iterator[Path]:
    """Loop-mount the file system in `image_path` on a temporary directory; yield that directory.

    `readonly` attaches the loop device read-only too (ext4 with a dirty journal then needs
    ``options="noload"``); `options` are extra mount options.

    On exit, always: unmount (flushing the writes to the image), detach the loop device,
    remove the directory, and fail if any loop device is still backed by the image.
    """
    image = Path(image_path).resolve()
    mountpoint = Path(tempfile.mkdtemp(prefix="coffer-bench-mnt-"))
    try:
        losetup = ["losetup", "--find", "--show"] + (["--read-only"] if readonly else [])
        device = _run([*losetup, str(image)]).stdout.strip()
        try:
            opts = ",".join(o for o in ("ro" if readonly else "rw", options) if o)
            _run(["mount", "-o", opts, *(["-t", fstype] if fstype else []), device,
                  str(mountpoint)])  # fmt: skip
            try:
                yield mountpoint
            finally:
                _umount(mountpoint)
        finally:
            subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)
    finally:
        mountpoint.rmdir()
    left = loop_devices_for(image)
    if left:
        raise RuntimeError(f"loop devices still attached to {image}: {left}")


# -- building ------------------------------------------------------------------------------


def _fs_ids(seed: int) -> tuple[str, str]:
    rng = random.Random(f"mkfs-{seed}")
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)), str(
        uuid.UUID(int=rng.getrandbits(128), version=4)
    )


def make_ext4(path: Path, size_bytes: int, seed: int, label: str = "coffer-bench") -> None:
    """A new sparse `path` of `size_bytes` holding an empty ext4 file system (fixed ids)."""
    if size_bytes % BLOCK:
        raise ValueError(f"image size {size_bytes} is not a multiple of {BLOCK}")
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(size_bytes)
    fs_uuid, hash_seed = _fs_ids(seed)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
    _run(["mkfs.ext4", "-F", "-q", "-b", str(BLOCK), "-m", "0", "-L", label, "-U", fs_uuid,
          # Inode tables and journal zeroed now, so no lazy-init thread writes to the image
          # while it is mounted later (that would make builds differ run to run).
          "-E", f"lazy_itable_init=0,lazy_journal_init=0,hash_seed={hash_seed}",
          str(path)], env=env)  # fmt: skip


# Same seed, same layout. ext4 lays files out deterministically only if every block is
# allocated by one task on one CPU: with delayed allocation (the default, kept: without it the
# allocation goal depends on the writer's PID) blocks are allocated at writeback, by whichever
# flusher thread on whichever CPU, and small files go to per-CPU preallocation groups. So the
# writer pins itself to one CPU and starts writeback of each file itself, right after writing
# it (sync_file_range(SYNC_FILE_RANGE_WRITE): allocation in the caller, no journal wait).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2


def _allocate_now(fd: int) -> None:
    if _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def _deterministic_writer() -> Iterator[None]:
    """Run the block below on one CPU only (see `_allocate_now`)."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def _allocated(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _write(path: Path, pieces: Iterator[bytes]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("wb") as f:
        for piece in pieces:
            f.write(piece)
            written += len(piece)
        f.flush()
        _allocate_now(f.fileno())
    return written


def write_files(
    root: Path, gen: FileGen, budgets: dict[str, int], prefix: str = "", serial: int = 0
) -> tuple[int, dict[str, int]]:
    """Write files of each kind under `root` until each kind's byte budget is spent.

    Kinds are interleaved (each file's kind drawn in proportion to what is left of its
    budget), as a disk that lived a while has them. Returns (files written, bytes by kind).
    """
    left = {kind: n for kind, n in budgets.items() if n > 0}
    written = dict.fromkeys(budgets, 0)
    files = 0
    rng = gen.rng
    while left:
        kinds = sorted(left)
        kind = rng.choices(kinds, weights=[left[k] for k in kinds], k=1)[0]
        serial += 1
        if kind == "binary":
            name, data = gen.libraries.take(max(left[kind], BLOCK))
            rel = f"usr/lib/x86_64-linux-gnu/{name}"
            if (root / prefix / rel).exists():
                rel = f"opt/{gen.vocab[rng.randrange(300)]}-{serial}/lib/{name}"
            n = _write(root / prefix / rel, iter((data,)))
        else:
            size = min(gen.size_for(kind), left[kind])
            rel = gen.relpath(kind, serial)
            n = _write(root / prefix / rel, gen.pieces(kind, size))
        files += 1
        written[kind] += n
        left[kind] -= _allocated(n)
        if left[kind] <= 0:
            del left[kind]
    return files, written


def _usage(root: Path) -> tuple[int, int]:
    """(capacity, bytes used) of the file system mounted on `root`."""
    st = os.statvfs(root)
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


def build_image(
    path: str | Path,
    size_bytes: int = 2 * GiB,
    fill: float = 0.6,
    seed: int = 1,
    mix: Mix | None = None,
) -> ImageInfo:
    """Build `path`: a sparse raw image of `size_bytes` with ext4 about `fill` full of files."""
    image = Path(path)
    make_ext4(image, size_bytes, seed)
    gen = FileGen(seed)
    with _deterministic_writer(), mounted(image) as root:
        capacity, already = _usage(root)
        target = int(capacity * fill)
        # Directories, extent blocks and partly used last blocks take room too: fill 90% of
        # the way, see what the files cost, then top up with the same mix.
        mix = mix or Mix()
        files, written = write_files(root, gen, mix.budgets(max(0, (target - already) * 9 // 10)))
        _, used = _usage(root)
        cost = (used - already) / max(1, sum(written.values()))
        if target > used:
            more, extra = write_files(
                root, gen, mix.budgets(int((target - used) / cost)), serial=files
            )
            files += more
            written = {kind: n + extra.get(kind, 0) for kind, n in written.items()}
        os.sync()
        _, used = _usage(root)
    return ImageInfo(image, size_bytes, capacity, used, files, written)


def build_sparse_image(
    path: str | Path, size_bytes: int, data_bytes: int = 64 * MiB, seed: int = 1
) -> int:
    """A raw image that is mostly holes: `data_bytes` of random data in 1 MiB extents.

    The extents sit at seeded 1 MiB-aligned offsets spread over the whole disk, so two sizes
    hold the same amount of data. Returns the data bytes written. Needs no root.
    """
    image = Path(path)
    image.unlink(missing_ok=True)
    rng = random.Random(f"sparse-{seed}")
    slots = size_bytes // MiB
    count = min(slots, data_bytes // MiB)
    with image.open("wb") as f:
        f.truncate(size_bytes)
        for slot in sorted(rng.sample(range(slots), count)):
            os.pwrite(f.fileno(), rng.randbytes(MiB), slot * MiB)
        os.fsync(f.fileno())
    return count * MiB


def copy_image(src: str | Path, dst: str | Path) -> None:
    """Copy an image keeping its holes (and sharing blocks where the file system can)."""
    Path(dst).unlink(missing_ok=True)
    _run(["cp", "--reflink=auto", "--sparse=always", str(src), str(dst)])


# -- churn ---------------------------------------------------------------------------------


def _overwrite(path: Path, offsets: list[int], length: int, rng: random.Random) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in offsets:
            os.pwrite(fd, rng.randbytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(offsets) * length


def churn_scatter(path: str | Path, fraction: float = 0.02, seed: int = 2) -> int:
    """Overwrite `fraction` of the image's 4 KiB blocks, chosen at random, with random bytes.

    Returns the bytes written.
    """
    image = Path(path)
    blocks = image.stat().st_size // BLOCK
    rng = random.Random(f"scatter-{seed}")
    chosen = sorted(rng.sample(range(blocks), round(blocks * fraction)))
    return _overwrite(image, [b * BLOCK for b in chosen], BLOCK, rng)


def churn_clustered(
    path: str | Path, fraction: float = 0.02, run_bytes: int = 256 << 10, seed: int = 3
) -> int:
    """Overwrite as many bytes as `churn_scatter` would, in runs of `run_bytes`.

    Runs start on 4 KiB boundaries at random and never overlap. Returns the bytes written.
    """
    if run_bytes % BLOCK:
        raise ValueError(f"run_bytes {run_bytes} is not a multiple of {BLOCK}")
    image = Path(path)
    size = image.stat().st_size
    total = round(size // BLOCK * fraction) * BLOCK
    runs = max(1, round(total / run_bytes))
    run_blocks = run_bytes // BLOCK
    last_start = size // BLOCK - run_blocks
    if runs * run_blocks * 2 > size // BLOCK:
        raise ValueError(f"{runs} runs of {run_bytes} B do not fit {size} B sparsely")
    rng = random.Random(f"clustered-{seed}")
    starts: list[int] = []
    taken: set[int] = set()
    while len(starts) < runs:
        start = rng.randrange(last_start + 1)
        span = range(start - run_blocks + 1, start + run_blocks)
        if any(s in taken for s in span):
            continue
        taken.add(start)
        starts.append(start)
    return _overwrite(image, [s * BLOCK for s in sorted(starts)], run_bytes, rng)


@dataclass(frozen=True)
class EditMix:
    """Shares of the edit budget by action (normalised when used)."""

    append: float = 0.15
    in_place: float = 0.30
    rewrite: float = 0.20
    new: float = 0.25
    delete: float = 0.10


def _regular_files(root: Path) -> list[tuple[Path, int]]:
    found: list[tuple[Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if "lost+found" in dirnames:
            dirnames.remove("lost+found")
        for name in sorted(filenames):
            p = Path(dirpath, name)
            found.append((p, p.stat().st_size))
    return found


def _new_contents(gen: FileGen, kind: str, size: int) -> Iterator[bytes]:
    # In-place edits of zeros are database pages being filled in; of media, new random bytes.
    if kind in ("zeros", "random"):
        return gen.random_pieces(size)
    return gen.pieces(kind, size)


def edit_files(
    path: str | Path, fraction: float = 0.02, seed: int = 4, mix: EditMix | None = None
) -> EditSummary:
    """Edit the file system in the image as programs would, about `fraction` of its file data.

    Appends to text files (logs, documents, code), overwrites ranges inside files, rewrites
    whole files (a new file renamed over the old, as editors and package managers do), writes
    new files (the same mix of kinds as the base) and deletes files. Unmounts when done.
    The same image and seed give the same edits in the same blocks.
    """
    mix = mix or EditMix()
    shares = {
        "append": mix.append,
        "in_place": mix.in_place,
        "rewrite": mix.rewrite,
        "new": mix.new,
        "delete": mix.delete,
    }
    whole = sum(shares.values())
    gen = FileGen(seed)
    rng = gen.rng
    with _deterministic_writer(), mounted(path) as root:
        files = _regular_files(root)
        data_bytes = sum(n for _, n in files)
        budget = int(data_bytes * fraction)
        summary = EditSummary(data_bytes=data_bytes, budget=budget)
        goal = {action: int(budget * share / whole) for action, share in shares.items()}
        summary.bytes = dict.fromkeys(goal, 0)
        summary.files = dict.fromkeys(goal, 0)
        touched: set[int] = set()
        orders: dict[str, Iterator[int]] = {}

        def next_file(action: str, accept: Callable[[Path, int], bool]) -> tuple[Path, int] | None:
            """A file not edited yet that `accept`s, in a random order of its own per action."""
            if action not in orders:
                order = list(range(len(files)))
                rng.shuffle(order)
                orders[action] = iter(order)
            for i in orders[action]:
                p, n = files[i]
                if i not in touched and accept(p, n):
                    touched.add(i)
                    return p, n
            return None

        def left(action: str) -> int:
            return goal[action] - summary.bytes[action]

        # Appends: logs mostly, documents and code sometimes.
        while summary.bytes["append"] < goal["append"]:
            got = next_file("append", lambda p, n: kind_of(p) in TEXT_KINDS)
            if got is None:
                break
            p, _ = got
            size = min(int(rng.lognormvariate(math.log(32 << 10), 1.0)) + 1, 1 << 20)
            size = min(size, left("append"))
            with p.open("ab") as f:
                f.write(gen.text(kind_of(p), size))
                f.flush()
                _allocate_now(f.fileno())
            summary.bytes["append"] += size
            summary.files["append"] += 1

        # In-place edits: a range inside a file, the file keeps its blocks.
        while summary.bytes["in_place"] < goal["in_place"]:
            got = next_file("in_place", lambda p, n: n >= 2 * BLOCK)
            if got is None:
                break
            p, n = got
            length = min(int(rng.lognormvariate(math.log(64 << 10), 1.2)) + 1, n // 2)
            length = min(length, left("in_place"))
            offset = rng.randrange(n - length)
            with p.open("r+b") as edited:
                edited.seek(offset)
                for piece in _new_contents(gen, kind_of(p), length):
                    edited.write(piece)
            summary.bytes["in_place"] += length
            summary.files["in_place"] += 1

        # Rewrites: a new version written beside the file and renamed over it. The renames
        # (which free the old blocks) wait until every new block is allocated: blocks freed
        # become reusable only when the journal commits, and that timing must not decide
        # where new data goes.
        renames: list[tuple[Path, Path]] = []
        while summary.bytes["rewrite"] < goal["rewrite"]:
            got = next_file(
                "rewrite",
                lambda p, n: 0 < n <= max(left("rewrite"), BLOCK) and kind_of(p) != "zeros",
            )
            if got is None:
                break
            p, n = got
            kind = kind_of(p)
            size = max(1, int(n * rng.uniform(0.8, 1.2)))
            tmp = p.with_name(p.name + ".new")
            if kind == "binary":
                size = _write(tmp, iter((gen.libraries.rebuild(p.read_bytes()),)))
            else:
                size = _write(tmp, _new_contents(gen, kind, size))
            renames.append((tmp, p))
            summary.bytes["rewrite"] += size
            summary.files["rewrite"] += 1

        # New files, the same mix of kinds as the base image.
        new_files, new_bytes = write_files(
            root, gen, Mix().budgets(goal["new"]), prefix=f"home/user0/new-{seed}"
        )
        summary.bytes["new"] = sum(new_bytes.values())
        summary.files["new"] = new_files

        for tmp, p in renames:
            os.replace(tmp, p)

        # Deletes.
        while summary.bytes["delete"] < goal["delete"]:
            got = next_file("delete", lambda p, n: n <= max(left("delete"), BLOCK))
            if got is None:
                break
            p, n = got
            p.unlink()
            summary.bytes["delete"] += n
            summary.files["delete"] += 1
        os.sync()
    return summary


def have_root_tools() -> bool:
    """Whether this process can build and mount images (root, losetup, mkfs.ext4)."""
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("losetup", "mount", "mkfs.ext4"))
