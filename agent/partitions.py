"""Partition tables read from a disk's bytes: GPT and MBR, checked and bounded.

The kernels Coffer runs on need not find partitions on a loop device (`losetup -P` creates
none on this project's machines), and a recovery point's disk is untrusted input, so the
table is read here, in Python, and each partition is then attached as its own loop device
by offset and size.

GPT (UEFI 2.10, section 5.3): a protective MBR (a partition of type 0xEE) at LBA 0, the
primary header at LBA 1, checked by its CRC32, its own LBA and its bounds, and its entry
array by the CRC32 the header records. When the primary header or its entries fail, the
backup header (at the disk's last LBA, or where the primary says) is used instead, and the
table's `notes` say so. Logical sectors of 512 and 4096 bytes are recognised.

MBR: the four primary entries at byte 446 (boot flag 0x00 or 0x80, else it is no MBR) and,
for an extended partition (0x05, 0x0F, 0x85), its chain of logical partitions (numbered
from 5, as Linux does). A file system that starts at byte 0 (FAT and NTFS boot sectors end
in 0x55AA too) is not taken for a table.

Hostile input is bounded: the entry array read is at most `MAX_ENTRY_BYTES`, a logical
chain at most `MAX_LOGICAL` links and never loops, and every partition lies inside the disk
(one that does not is left out, with a note).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import CorruptData

Read = Callable[[int, int], bytes]
"""read(offset, length): the disk's bytes there (fewer at its end)."""

SECTOR_SIZES = (512, 4096)
MAX_ENTRY_BYTES = 1 << 20  # a GPT entry array larger than this is refused (128 entries: 16 KiB)
MAX_LOGICAL = 128  # logical partitions followed in an MBR extended partition

GPT_SIGNATURE = b"EFI PART"
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # up to and including the entry array CRC
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
_MBR_ENTRY = struct.Struct("<B3sB3sII")
_PROTECTIVE = 0xEE
_EXTENDED = frozenset({0x05, 0x0F, 0x85})


@dataclass(frozen=True)
class Partition:
    """One partition: its number as Linux names it, and where it lies on the disk."""

    number: int
    offset: int  # bytes from the disk's start
    size: int  # bytes
    type: str  # GPT: the type GUID; MBR: the type byte as "0x83"
    name: str = ""  # GPT partition name


@dataclass(frozen=True)
class PartitionTable:
    scheme: str  # "gpt", "mbr", or "none" (the disk holds no table: one file system, or none)
    sector_size: int
    partitions: tuple[Partition, ...]
    notes: tuple[str, ...] = ()  # what was damaged or odd, and what was done about it


def read_partition_table(read: Read, disk_size: int) -> PartitionTable:
    """The disk's partition table; CorruptData when it has one that cannot be read."""
    mbr = read(0, 512)
    entries = _mbr_entries(mbr)
    if entries is not None and any(kind == _PROTECTIVE for _, kind, _, _ in entries):
        return _gpt(read, disk_size)
    # A GPT disk whose protective MBR was overwritten still has its headers.
    for sector in SECTOR_SIZES:
        if read(sector, len(GPT_SIGNATURE)) == GPT_SIGNATURE:
            table = _gpt(read, disk_size)
            notes = ("the disk has a GPT header but no protective MBR", *table.notes)
            return PartitionTable(table.scheme, table.sector_size, table.partitions, notes)
    if entries is None:
        return PartitionTable("none", 512, ())
    return _mbr(read, disk_size, entries)


# --- GPT ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GptHeader:
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int


def _gpt(read: Read, disk_size: int) -> PartitionTable:
    problems: list[str] = []
    for sector in SECTOR_SIZES:
        sectors = disk_size // sector
        if sectors < 3:
            continue
        primary, why = _gpt_header(read, sector, 1, sectors)
        if primary is not None:
            array, why = _gpt_entries(read, sector, primary)
            if array is not None:
                return _gpt_table(sector, primary, array, disk_size, ())
        problems.append(f"{sector}-byte sectors: primary: {why}")
        # The backup: where the primary says, and at the disk's last LBA in any case.
        candidates = (primary.alternate_lba,) if primary is not None else ()
        for lba in dict.fromkeys((*candidates, sectors - 1)):
            if not 1 < lba < sectors:
                continue
            backup, backup_why = _gpt_header(read, sector, lba, sectors)
            if backup is not None:
                array, backup_why = _gpt_entries(read, sector, backup)
                if array is not None:
                    note = f"the primary GPT is damaged ({why}); the backup at LBA {lba} was used"
                    return _gpt_table(sector, backup, array, disk_size, (note,))
            problems.append(f"{sector}-byte sectors: backup at LBA {lba}: {backup_why}")
    raise CorruptData(what="the GPT partition table", detail="; ".join(problems) or "no header")


def _gpt_header(read: Read, sector: int, lba: int, sectors: int) -> tuple[_GptHeader | None, str]:
    """The GPT header at `lba`, or None and why it is not one."""
    raw = read(lba * sector, sector)
    if len(raw) < _GPT_HEADER.size or raw[:8] != GPT_SIGNATURE:
        return None, "no GPT signature"
    (
        _,
        _revision,
        header_size,
        header_crc,
        _reserved,
        my_lba,
        alternate_lba,
        first_usable,
        last_usable,
        _disk_guid,
        entries_lba,
        entry_count,
        entry_size,
        entries_crc,
    ) = _GPT_HEADER.unpack_from(raw)
    if not _GPT_HEADER.size <= header_size <= sector:
        return None, f"header size {header_size} is out of range"
    checked = bytearray(raw[:header_size])
    checked[16:20] = bytes(4)
    if zlib.crc32(checked) != header_crc:
        return None, "header CRC32 mismatch"
    if my_lba != lba:
        return None, f"header says it is at LBA {my_lba}, found at {lba}"
    if not 0 < first_usable <= last_usable < sectors:
        return None, f"usable LBAs {first_usable}-{last_usable} are outside the disk"
    if entry_size < _GPT_ENTRY.size or entry_size % 8 or entry_count * entry_size > MAX_ENTRY_BYTES:
        return None, f"{entry_count} entries of {entry_size} bytes are out of range"
    array_sectors = -(-(entry_count * entry_size) // sector)
    if entries_lba < 2 or entries_lba + array_sectors > sectors:
        return None, f"the entry array at LBA {entries_lba} is outside the disk"
    header = _GptHeader(
        my_lba,
        alternate_lba,
        first_usable,
        last_usable,
        entries_lba,
        entry_count,
        entry_size,
        entries_crc,
    )
    return header, ""


def _gpt_entries(read: Read, sector: int, header: _GptHeader) -> tuple[bytes | None, str]:
    length = header.entry_count * header.entry_size
    array = read(header.entries_lba * sector, length)
    if len(array) != length:
        return None, "the entry array is cut short"
    if zlib.crc32(array) != header.entries_crc:
        return None, "entry array CRC32 mismatch"
    return array, ""


def _gpt_table(
    sector: int, header: _GptHeader, array: bytes, disk_size: int, notes: tuple[str, ...]
) -> PartitionTable:
    found = []
    problems = list(notes)
    for index in range(header.entry_count):
        type_guid, _unique, first, last, _attributes, name = _GPT_ENTRY.unpack_from(
            array, index * header.entry_size
        )
        if type_guid == bytes(16):
            continue  # an unused entry
        number = index + 1
        if not header.first_usable <= first <= last <= header.last_usable:
            problems.append(f"partition {number} (LBA {first}-{last}) is outside the usable area")
            continue
        offset, size = first * sector, (last - first + 1) * sector
        if offset + size > disk_size:
            problems.append(f"partition {number} ends beyond the disk")
            continue
        label = name.decode("utf-16-le", errors="replace").split("\0", 1)[0]
        kind = str(uuid.UUID(bytes_le=type_guid))
        found.append(Partition(number, offset, size, kind, label))
    return PartitionTable("gpt", sector, tuple(found), tuple(problems))


# --- MBR ---------------------------------------------------------------------------------


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]] | None:
    """(slot, type, first LBA, sectors) of the used entries of an MBR; None when `sector`
    holds no partition table."""
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return None
    # File systems whose boot sector carries the same signature.
    if sector[3:11] == b"NTFS    " or sector[54:59] == b"FAT12" or sector[54:59] == b"FAT16":
        return None
    if sector[82:87] == b"FAT32":
        return None
    entries = []
    for slot in range(4):
        flag, _, kind, _, first, count = _MBR_ENTRY.unpack_from(sector, 446 + 16 * slot)
        if flag not in (0x00, 0x80):
            return None
        if kind != 0 and count != 0:
            entries.append((slot, kind, first, count))
    return entries or None


def _mbr(read: Read, disk_size: int, entries: list[tuple[int, int, int, int]]) -> PartitionTable:
    sector = 512
    found: list[Partition] = []
    notes: list[str] = []

    def add(number: int, kind: int, first: int, count: int) -> None:
        offset, size = first * sector, count * sector
        if first == 0 or offset + size > disk_size:
            notes.append(f"partition {number} (LBA {first}, {count} sectors) is outside the disk")
            return
        found.append(Partition(number, offset, size, f"0x{kind:02x}"))

    extended: tuple[int, int] | None = None
    for slot, kind, first, count in entries:
        if kind in _EXTENDED:
            if extended is None:
                extended = (first, count)
            else:
                notes.append(f"a second extended partition in slot {slot + 1} was ignored")
            continue
        add(slot + 1, kind, first, count)
    if extended is not None:
        _logical(read, extended, add, notes)
    return PartitionTable("mbr", sector, tuple(found), tuple(notes))


def _logical(
    read: Read,
    extended: tuple[int, int],
    add: Callable[[int, int, int, int], None],
    notes: list[str],
) -> None:
    """Follow the chain of extended boot records inside `extended` (first LBA, sectors)."""
    start, count = extended
    end = start + count
    link = start
    seen: set[int] = set()
    number = 5
    while len(seen) < MAX_LOGICAL:
        if link in seen or not start <= link < end:
            notes.append(f"the chain of logical partitions breaks at LBA {link}")
            return
        seen.add(link)
        record = read(link * 512, 512)
        if len(record) < 512 or record[510:512] != b"\x55\xaa":
            notes.append(f"no extended boot record at LBA {link}")
            return
        _, _, kind, _, first, sectors = _MBR_ENTRY.unpack_from(record, 446)
        if kind != 0 and sectors != 0:
            if link + first + sectors <= end:
                add(number, kind, link + first, sectors)
            else:
                notes.append(f"logical partition {number} extends beyond its extended partition")
            number += 1
        _, _, next_kind, _, next_first, _ = _MBR_ENTRY.unpack_from(record, 446 + 16)
        if next_kind not in _EXTENDED or next_first == 0:
            return
        link = start + next_first
    notes.append(f"more than {MAX_LOGICAL} logical partitions; the rest were ignored")
