"""Partition tables read from a disk's bytes: what sfdisk wrote is what is read, the GPT
backup stands in for a damaged primary, and hostile tables are bounded and refused."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from agent.partitions import MAX_ENTRY_BYTES, read_partition_table
from shared.errors import CorruptData

MiB = 1 << 20
LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"


def sfdisk(image: Path, script: str, size: int = 64 * MiB) -> None:
    with image.open("wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", str(image)], input=script, text=True, check=True)


def sfdisk_view(image: Path) -> list[tuple[int, int]]:
    """(offset, size) in bytes of each partition, as sfdisk reads the table."""
    out = subprocess.run(
        ["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True
    ).stdout
    table = json.loads(out)["partitiontable"]
    sector = table.get("sectorsize", 512)
    return [(p["start"] * sector, p["size"] * sector) for p in table["partitions"]]


def parse(image: Path, reads: list[tuple[int, int]] | None = None):  # type: ignore[no-untyped-def]
    data = image.read_bytes()

    def read(offset: int, length: int) -> bytes:
        if reads is not None:
            reads.append((offset, length))
        return data[offset : offset + length]

    return read_partition_table(read, len(data))


GPT_SCRIPT = """label: gpt
size=10MiB, type=linux, name="root fs"
size=20MiB, type=swap
type=linux
"""


def test_a_gpt_table_reads_as_sfdisk_wrote_it(tmp_path: Path) -> None:
    image = tmp_path / "gpt.img"
    sfdisk(image, GPT_SCRIPT)
    table = parse(image)
    assert table.scheme == "gpt"
    assert table.sector_size == 512
    assert table.notes == ()
    assert [(p.offset, p.size) for p in table.partitions] == sfdisk_view(image)
    assert [p.number for p in table.partitions] == [1, 2, 3]
    assert table.partitions[0].name == "root fs"
    assert table.partitions[0].type == LINUX
    assert table.partitions[1].type == "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"  # swap


def test_an_mbr_table_with_logical_partitions(tmp_path: Path) -> None:
    image = tmp_path / "mbr.img"
    sfdisk(
        image,
        "label: dos\nsize=10MiB, type=83\nsize=10MiB, type=82\ntype=5\n"
        "size=5MiB, type=83\nsize=5MiB, type=83\n",
    )
    table = parse(image)
    assert table.scheme == "mbr"
    assert [p.number for p in table.partitions] == [1, 2, 5, 6]
    listed = sfdisk_view(image)  # 1, 2, the extended partition 3, then 5 and 6
    assert [(p.offset, p.size) for p in table.partitions] == listed[:2] + listed[3:]
    assert [p.type for p in table.partitions] == ["0x83", "0x82", "0x83", "0x83"]


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_a_file_system_without_a_table_is_no_table(tmp_path: Path, fstype: str) -> None:
    image = tmp_path / f"{fstype}.img"
    with image.open("wb") as f:
        f.truncate(320 * MiB)
    mkfs = ["mkfs.xfs", "-q", "-f"] if fstype == "xfs" else ["mkfs.ext4", "-q", "-F"]
    subprocess.run([*mkfs, str(image)], check=True, capture_output=True)
    table = parse(image)
    assert (table.scheme, table.partitions) == ("none", ())


def test_boot_sectors_of_fat_and_ntfs_are_not_tables(tmp_path: Path) -> None:
    for marker, at in ((b"NTFS    ", 3), (b"FAT32", 82), (b"FAT16", 54)):
        sector = bytearray(512)
        sector[at : at + len(marker)] = marker
        sector[510:512] = b"\x55\xaa"
        image = tmp_path / "boot.img"
        image.write_bytes(bytes(sector) + bytes(MiB))
        assert parse(image).scheme == "none"


def gpt_header_crc(image: Path, lba: int) -> None:
    """Recompute the CRC32 of the GPT header at `lba` (512-byte sectors) in place."""
    with image.open("r+b") as f:
        f.seek(lba * 512)
        header = bytearray(f.read(512))
        size = struct.unpack_from("<I", header, 12)[0]
        header[16:20] = bytes(4)
        header[16:20] = struct.pack("<I", zlib.crc32(header[:size]))
        f.seek(lba * 512)
        f.write(header)


def flip(image: Path, offset: int) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_damaged_primary_header_falls_back_to_the_backup(tmp_path: Path) -> None:
    image = tmp_path / "gpt.img"
    sfdisk(image, GPT_SCRIPT)
    expected = sfdisk_view(image)
    flip(image, 512 + 60)  # inside the primary header: its CRC fails
    table = parse(image)
    assert [(p.offset, p.size) for p in table.partitions] == expected
    assert "backup" in table.notes[0]
    assert "CRC32" in table.notes[0]


def test_damaged_primary_entries_fall_back_to_the_backup(tmp_path: Path) -> None:
    image = tmp_path / "gpt.img"
    sfdisk(image, GPT_SCRIPT)
    expected = sfdisk_view(image)
    flip(image, 1024 + 40)  # the first entry's first LBA, in the primary array
    table = parse(image)
    assert [(p.offset, p.size) for p in table.partitions] == expected
    assert "entry array CRC32 mismatch" in table.notes[0]


def test_both_headers_damaged_is_corrupt_data(tmp_path: Path) -> None:
    image = tmp_path / "gpt.img"
    sfdisk(image, GPT_SCRIPT)
    flip(image, 512 + 60)
    flip(image, os.path.getsize(image) - 512 + 60)
    with pytest.raises(CorruptData, match="GPT") as raised:
        parse(image)
    assert raised.value.exit_code == 7


def test_a_huge_entry_array_is_refused_without_reading_it(tmp_path: Path) -> None:
    image = tmp_path / "gpt.img"
    sfdisk(image, GPT_SCRIPT)
    last = os.path.getsize(image) // 512 - 1
    for lba in (1, last):
        with image.open("r+b") as f:
            f.seek(lba * 512 + 80)
            f.write(struct.pack("<I", 1 << 28))  # entries
        gpt_header_crc(image, lba)
    reads: list[tuple[int, int]] = []
    with pytest.raises(CorruptData, match="out of range"):
        parse(image, reads)
    assert max(length for _, length in reads) <= MAX_ENTRY_BYTES


def test_a_partition_outside_the_disk_is_left_out_with_a_note(tmp_path: Path) -> None:
    image = tmp_path / "gpt.img"
    sfdisk(image, GPT_SCRIPT)
    last = os.path.getsize(image) // 512 - 1
    with image.open("r+b") as f:
        for lba, entries_lba in ((1, 2), (last, last - 32)):
            f.seek(entries_lba * 512 + 128 + 40)  # the second entry's last LBA
            f.write(struct.pack("<Q", 1 << 40))
            f.seek(entries_lba * 512)
            array = f.read(128 * 128)
            f.seek(lba * 512 + 88)
            f.write(struct.pack("<I", zlib.crc32(array)))
    gpt_header_crc(image, 1)
    gpt_header_crc(image, last)
    table = parse(image)
    assert [p.number for p in table.partitions] == [1, 3]
    assert any("partition 2" in note for note in table.notes)


def mbr(entries: list[tuple[int, int, int]]) -> bytearray:
    sector = bytearray(512)
    for slot, (kind, first, count) in enumerate(entries):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * slot, 0, b"", kind, b"", first, count)
    sector[510:512] = b"\x55\xaa"
    return sector


def test_hostile_mbr_tables_are_bounded(tmp_path: Path) -> None:
    size = 8 * MiB
    sectors = size // 512
    image = bytearray(size)
    # A primary partition past the end, one inside, and an extended partition whose chain
    # of boot records loops back on itself.
    image[0:512] = mbr([(0x83, sectors + 10, 100), (0x83, 2048, 2048), (0x05, 8192, 4096)])
    image[8192 * 512 : 8193 * 512] = mbr([(0x83, 63, 30), (0x05, 100, 100)])
    image[8292 * 512 : 8293 * 512] = mbr([(0x83, 63, 10), (0x05, 100, 100)])  # to itself
    path = tmp_path / "loop.img"
    path.write_bytes(bytes(image))
    table = parse(path)
    assert [(p.number, p.offset) for p in table.partitions] == [
        (2, 2048 * 512),
        (5, (8192 + 63) * 512),
        (6, (8292 + 63) * 512),
    ]
    assert any("partition 1" in note for note in table.notes)
    assert any("breaks" in note for note in table.notes)


@pytest.mark.root
def test_a_gpt_disk_of_4096_byte_sectors(tmp_path: Path) -> None:
    image = tmp_path / "4k.img"
    with image.open("wb") as f:
        f.truncate(64 * MiB)
    device = subprocess.run(
        ["losetup", "--find", "--show", "--sector-size", "4096", str(image)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        subprocess.run(
            ["sgdisk", "-n", "1:0:+10M", "-n", "2:0:0", device], capture_output=True, check=True
        )
        out = subprocess.run(
            ["sfdisk", "--json", device], capture_output=True, text=True, check=True
        ).stdout
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)
    expected = [
        (p["start"] * 4096, p["size"] * 4096)
        for p in json.loads(out)["partitiontable"]["partitions"]
    ]
    table = parse(image)
    assert table.sector_size == 4096
    assert [(p.offset, p.size) for p in table.partitions] == expected
