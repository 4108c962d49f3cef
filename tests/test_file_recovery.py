"""File recovery end to end on the agent's side, with real FUSE, loop devices and mounts.

Disk images with known content (an ext4 disk, an XFS disk, and a GPT disk holding one of
each) are chunked as a backup would chunk them and served from memory by a source that
counts what it is asked for. A recovery point is opened through the agent's FUSE disk
files, its partitions attached read-only and mounted without journal replay; files are
listed and copied out and checked byte for byte with their metadata; a small file costs a
small fraction of the disk; a damaged chunk is an error naming it, never wrong bytes; and
nothing is left mounted or attached afterwards, whatever happened.
"""

from __future__ import annotations

import asyncio
import errno
import json
import mmap
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.chunk_source import FetchedChunk
from agent.disk_files import DiskFiles
from agent.file_recovery import MountedDisk, RecoveryMounts, mountpoints
from agent.recovered_files import copy_out, list_directory
from shared.digest import ChunkHash
from shared.errors import Conflict, DataCorrupted, InvalidArgument, NotFound
from shared.index import DiskIndex
from tests.chunked import CHUNK_SIZE, MemorySource, chunk_image
from tests.loopfs import mkfs, run
from tests.recovery_content import LARGE, ODD_NAME, SPARSE, allocated, manifest
from tests.recovery_images import build_images

PLAIN = ChunkHash()  # the chunks here are named by plain BLAKE3, as in a format-1 datastore

MiB = 1 << 20

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

# Whatever is mounted from a recovery point is served by this test's event loop (FUSE):
# every read of it happens in a thread, or the loop would wait for itself.


@dataclass(frozen=True)
class Image:
    path: Path
    index: DiskIndex
    chunks: dict[bytes, FetchedChunk]
    manifests: dict[str, dict[str, tuple[object, ...]]]  # per partition name ("disk": none)


def _image(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image]:
    built = {}
    for kind, image in build_images(tmp_path_factory.mktemp("images")).items():
        index, chunks = chunk_image(image.path, disk=f"{kind}0")
        built[kind] = Image(image.path, index, chunks, image.manifests)
    return built


def leftovers(work_dir: Path, fuse: bool = False) -> list[str]:
    """Mounts under `work_dir` (with `fuse`, its FUSE mount too) and loop devices attached
    to files under it."""
    mounted = [
        str(p)
        for p in mountpoints()
        if p.is_relative_to(work_dir) and (fuse or p != work_dir / "disks")
    ]
    listing = json.loads(run("losetup", "--list", "--json", "--output", "NAME,BACK-FILE") or "{}")
    loops = [
        d["name"]
        for d in listing.get("loopdevices", [])
        if str(work_dir) in (d.get("back-file") or "")
    ]
    return mounted + loops


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[RecoveryMounts]:
    work_dir = tmp_path / "files"
    async with RecoveryMounts(work_dir) as mounts:
        yield mounts
    assert leftovers(work_dir, fuse=True) == []


def copied_manifest(root: Path) -> dict[str, tuple[object, ...]]:
    return manifest(root)


def without_fifo(found: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    return {path: record for path, record in found.items() if record[0] != 0o010000}


async def check_file_system(
    mounted: MountedDisk, prefix: str, expected: dict[str, tuple[object, ...]], out: Path
) -> None:
    """List and copy everything of one file system; compare with what was written."""
    fs, parts = mounted.locate(f"{prefix}/")
    listing = await asyncio.to_thread(list_directory, fs.path, parts)
    names = {entry.name for entry in listing.entries}
    assert {"etc", "home", "tree", "links", "large.bin", "sparse.bin", "fifo", "which"} <= names
    links = await asyncio.to_thread(list_directory, fs.path, (*parts, "links"))
    assert {(e.name, e.target) for e in links.entries} >= {("abs", "/etc/passwd")}
    sources = [
        (fs.path, (*parts, entry.name))
        for entry in listing.entries
        if entry.name not in ("lost+found",)
    ]
    report = await asyncio.to_thread(copy_out, sources, [out.parent], str(out))
    assert report.skipped == ["fifo"]
    assert report.hard_links == 1
    assert without_fifo(copied_manifest(out)) == {
        path: record
        for path, record in without_fifo(expected).items()
        if not path.startswith("lost+found")
    }
    check_special_files(out)


def check_special_files(out: Path) -> None:
    assert allocated(out / "sparse.bin") < MiB
    assert os.path.getsize(out / "sparse.bin") == SPARSE
    assert os.path.getsize(out / "large.bin") == LARGE
    assert (out / "tree" / ODD_NAME).read_bytes() == b"soup of the day\n"


def mount_options(path: Path) -> list[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        if line.split()[1] == str(path):
            return line.split()[3].split(",")
    raise AssertionError(f"{path} is not mounted")


@pytest.mark.parametrize("kind", ["ext4", "xfs"])
async def test_files_of_a_file_system_come_back_whole(
    host: RecoveryMounts, images: dict[str, Image], tmp_path: Path, kind: str
) -> None:
    image = images[kind]
    source = MemorySource(dict(image.chunks))
    async with host.open(
        f"rp1-{kind}", image.index, source, recovery_point="rp1", chunk_hash=PLAIN
    ) as mounted:
        assert not mounted.partitioned
        assert [(fs.name, fs.fs_type) for fs in mounted.file_systems] == [("disk", kind)]
        fs = mounted.file_systems[0]
        assert "ro" in mount_options(fs.path)
        (tmp_path / "restore").mkdir()
        lost_found = kind == "ext4"
        expected = dict(image.manifests["disk"])
        await check_file_system(mounted, "", expected, tmp_path / "restore" / "out")
        assert mounted.disk.errors == []
        assert mounted.disk.stats.chunks_fetched == len(set(source.asked))
        assert lost_found == await asyncio.to_thread((fs.path / "lost+found").exists)


async def test_a_gpt_disk_with_two_file_systems(
    host: RecoveryMounts, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["gpt"]
    source = MemorySource(dict(image.chunks))
    async with host.open(
        "rp1-gpt", image.index, source, recovery_point="rp1", chunk_hash=PLAIN
    ) as mounted:
        assert mounted.partitioned
        assert [(fs.name, fs.fs_type) for fs in mounted.file_systems] == [
            ("p1", "ext4"),
            ("p2", "xfs"),
        ]
        restore = tmp_path / "restore"
        restore.mkdir()
        for name in ("p1", "p2"):
            fs, parts = mounted.locate(f"/{name}/which")
            assert parts == ("which",)
            assert await asyncio.to_thread((fs.path / "which").read_text) == name
            await check_file_system(mounted, f"/{name}", image.manifests[name], restore / name)
        with pytest.raises(NotFound):
            mounted.locate("/p3/etc")
        with pytest.raises(InvalidArgument):
            mounted.locate("/")
        with pytest.raises(InvalidArgument):
            mounted.locate("/p1/../p2")


async def test_one_small_file_costs_a_small_fraction_of_the_disk(
    host: RecoveryMounts, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["ext4"]
    source = MemorySource(dict(image.chunks))
    restore = tmp_path / "restore"
    restore.mkdir()
    started = time.monotonic()
    async with host.open(
        "rp1-small", image.index, source, recovery_point="rp1", chunk_hash=PLAIN
    ) as mounted:
        fs, parts = mounted.locate("/small.txt")
        report = await asyncio.to_thread(copy_out, [(fs.path, parts)], [restore], str(restore))
        stats = mounted.disk.stats
        took = time.monotonic() - started
    assert report.files == 1
    assert (restore / "small.txt").read_bytes().startswith(b"MARKER-OF-THE-SMALL-FILE")
    fetched = stats.raw_bytes_fetched
    print(
        f"small file: {stats.chunks_fetched} chunks, {fetched / MiB:.1f} MiB raw, "
        f"{stats.bytes_fetched / MiB:.1f} MiB stored, "
        f"of a {image.index.size_bytes / MiB:.0f} MiB disk; opened and copied in {took:.2f} s"
    )
    assert fetched < 0.05 * image.index.size_bytes
    assert stats.bytes_fetched == source.bytes_served


def chunk_holding(image: Image, marker: bytes) -> int:
    with image.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = data.find(marker)
    assert at >= 0
    return at // CHUNK_SIZE


async def test_a_damaged_chunk_gives_eio_and_a_typed_error_never_wrong_data(
    host: RecoveryMounts, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["ext4"]
    number = chunk_holding(image, b"MARKER-OF-THE-SMALL-FILE")
    digest = image.index.digest_at(number)
    source = MemorySource(dict(image.chunks))
    source.corrupt(digest)
    restore = tmp_path / "restore"
    restore.mkdir()
    async with host.open(
        "rp1-bad", image.index, source, recovery_point="rp1", chunk_hash=PLAIN
    ) as mounted:
        fs, parts = mounted.locate("/small.txt")
        with pytest.raises(OSError, match="Input/output error") as failed:
            await asyncio.to_thread((fs.path / "small.txt").read_bytes)
        assert failed.value.errno == errno.EIO
        with pytest.raises(OSError, match="Input/output error") as failed:
            await asyncio.to_thread(copy_out, [(fs.path, parts)], [restore], str(restore))
        error = mounted.explain(failed.value)
        assert isinstance(error, DataCorrupted)
        assert error.exit_code == 7
        assert error.fields["chunk"] == number
        assert error.fields["digest"] == digest.hex()
        assert error.fields["disk"] == "ext40"
        # Data in other chunks still reads, and is what the disk holds there.

        def head_of_large() -> bytes:
            with (fs.path / "large.bin").open("rb") as f:
                return f.read(4096)

        head = await asyncio.to_thread(head_of_large)
        assert chunk_holding(image, head) != number
    assert list(restore.iterdir()) == []


async def test_everything_is_taken_down_after_an_error_in_the_block(
    host: RecoveryMounts, images: dict[str, Image]
) -> None:
    image = images["gpt"]

    class Boom(Exception):
        pass

    async def open_and_fail() -> None:
        source = MemorySource(dict(image.chunks))
        async with host.open(
            "rp1-err", image.index, source, recovery_point="rp1", chunk_hash=PLAIN
        ) as mounted:
            assert len(mounted.file_systems) == 2
            assert leftovers(host.work_dir) != []
            raise Boom

    with pytest.raises(Boom):
        await open_and_fail()
    assert leftovers(host.work_dir) == []
    assert host.opened == {}
    assert list((host.work_dir / "mounts").iterdir()) == []
    assert await asyncio.to_thread(os.listdir, host.work_dir / "disks") == []


async def test_a_cancelled_open_leaves_nothing(
    host: RecoveryMounts, images: dict[str, Image]
) -> None:
    image = images["xfs"]
    source = MemorySource(dict(image.chunks))
    opened = asyncio.Event()

    async def open_and_wait() -> None:
        async with host.open(
            "rp1-cancel", image.index, source, recovery_point="rp1", chunk_hash=PLAIN
        ):
            opened.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(open_and_wait())
    # Cancelled while mounting: the mount waits for chunks that do not come.
    await source.called.wait()
    source.gate = asyncio.Event()
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not opened.is_set()
    assert leftovers(host.work_dir) == []
    assert host.opened == {}


async def test_names_are_unique_and_one_fuse_server_per_process(
    host: RecoveryMounts, images: dict[str, Image], tmp_path: Path
) -> None:
    image = images["ext4"]
    source = MemorySource(dict(image.chunks))
    async with host.open("same", image.index, source, recovery_point="rp1", chunk_hash=PLAIN):
        with pytest.raises(Conflict):
            async with host.open(
                "same", image.index, source, recovery_point="rp1", chunk_hash=PLAIN
            ):
                pass
        assert set(host.opened) == {"same"}
    with pytest.raises(Conflict):
        async with DiskFiles(tmp_path / "other"):
            pass


async def test_what_a_dead_agent_left_is_swept_at_start(
    images: dict[str, Image], tmp_path: Path
) -> None:
    work_dir = tmp_path / "files"
    # An earlier run's leftovers: a loop device on a file under disks/, mounted under mounts/.
    (work_dir / "disks").mkdir(parents=True)
    stale = work_dir / "disks" / "stale.img"
    _image(stale, 64 * MiB)
    mkfs("ext4", stale)
    device = run("losetup", "--find", "--show", "--read-only", str(stale)).strip()
    target = work_dir / "mounts" / "old" / "disk"
    target.mkdir(parents=True)
    run("mount", "-o", "ro", device, str(target))
    assert leftovers(work_dir) != []
    async with RecoveryMounts(work_dir):
        assert leftovers(work_dir, fuse=True) == [str(work_dir / "disks")]  # its own only
        assert not target.exists()
    assert leftovers(work_dir, fuse=True) == []
