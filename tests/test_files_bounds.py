"""File recovery's bounds and escapes, without a cluster: what a hostile file system or agent
can put in front of the controller and the operator.

- names shown escaped (bytes that are not UTF-8, terminal escapes, newlines, backslashes);
- a listing page cut by the agent at its bytes, and refused by the controller past its
  bounds (entries, name and target lengths, '/' or NUL in a name, unknown types);
- TTLs as the CLI reads them.
"""

from __future__ import annotations

import click
import pytest

from agent.file_recovery_jobs import LISTING_BYTES, page
from agent.recovered_files import Entry, Listing
from controller.cli.files import parse_ttl
from controller.jobs.file_recovery import checked_listing
from shared.errors import CorruptData
from shared.printable import shown
from shared.rpc import agent_pb2, common_pb2


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"notes.txt", "notes.txt"),
        ("café".encode(), "café"),
        (b"caf\xe9 menu.txt", "caf\\xe9 menu.txt"),
        (b"\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        (b"two\nlines", "two\\nlines"),
        (b"back\\slash", "back\\\\slash"),
        ("\u202eexe.txt".encode(), "\\u202eexe.txt"),  # right-to-left override
    ],
)
def test_names_are_shown_escaped(raw: bytes, text: str) -> None:
    assert shown(raw) == text
    assert shown(raw).isprintable()


def entry(name: str, target: str | None = None) -> Entry:
    kind = "symlink" if target is not None else "file"
    return Entry(name, kind, 1, 0, 0o644, 0, 0, 1, target)


def test_the_agent_cuts_a_page_at_its_bytes_and_says_where_to_go_on() -> None:
    long_target = "t" * 4000
    names = [f"link{i:05d}" for i in range(2000)]
    listing = Listing("/d", tuple(entry(n, long_target) for n in names), None)
    first = page(b"/d", listing)
    assert 0 < len(first.entries) < len(names)
    assert first.ByteSize() < LISTING_BYTES + 64 * 1024
    assert first.next_after == first.entries[-1].name
    # A page within the bytes keeps the listing's own continuation.
    small = page(b"/d", Listing("/d", (entry("a"), entry("b")), "b"))
    assert [e.name for e in small.entries] == [b"a", b"b"]
    assert small.next_after == b"b"


def test_a_link_target_is_cut_at_4096_bytes() -> None:
    (cut,) = page(b"/", Listing("/", (entry("l", "x" * 9000),), None)).entries
    assert len(cut.link_target) == 4096
    assert cut.note


def listing(*entries: common_pb2.FileEntry, next_after: bytes = b"") -> agent_pb2.FileListing:
    return agent_pb2.FileListing(path=b"/", entries=entries, next_after=next_after)


def file_entry(name: bytes, **fields: object) -> common_pb2.FileEntry:
    return common_pb2.FileEntry(name=name, type=str(fields.pop("type", "file")), **fields)  # type: ignore[arg-type]


def test_the_controller_takes_a_page_within_its_bounds() -> None:
    page_in = listing(file_entry(b"a"), file_entry(b"caf\xe9", type="dir"), next_after=b"caf\xe9")
    assert checked_listing(page_in, 2) is page_in


@pytest.mark.parametrize(
    "hostile",
    [
        listing(*(file_entry(f"f{i}".encode()) for i in range(3))),  # more than asked
        listing(file_entry(b"")),
        listing(file_entry(b"a/b")),
        listing(file_entry(b"a\0b")),
        listing(file_entry(b"n" * 256)),
        listing(file_entry(b"l", type="symlink", link_target=b"t" * 4097)),
        listing(file_entry(b"x", type="door")),
        listing(file_entry(b"a"), next_after=b"n" * 256),
    ],
)
def test_the_controller_refuses_a_page_past_its_bounds(hostile: agent_pb2.FileListing) -> None:
    with pytest.raises(CorruptData):
        checked_listing(hostile, 2)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("2h30m", 9000), ("7d", 604800)],
)
def test_ttls_read_as_people_write_them(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "8d", "1x", "h", "-5"])
def test_bad_ttls_are_refused(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_ttl(text)
