"""Listing and copying out files of a recovery point's file system, on a plain directory
(the mounted case is in test_file_recovery): metadata kept, links never followed out of
the tree, writes only below restore_dirs, nothing left by a refused or failed copy."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.recovered_files import copy_out, list_directory
from shared.errors import (
    InvalidArgument,
    NotFound,
    PathNotAllowed,
    RestoreTargetExists,
    RestoreTargetFailed,
)
from tests.recovery_content import LARGE, ODD_NAME, SPARSE, allocated, manifest, populate

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "fs"
    root.mkdir()
    populate(root)
    return root


@pytest.fixture
def restore_dir(tmp_path: Path) -> Path:
    path = tmp_path / "restore"
    path.mkdir()
    return path


TOP_LEVEL = ("tree", "home", "links", "sparse.bin", "large.bin", "etc", "fifo", "empty-dir")


def without_fifo(found: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    return {path: record for path, record in found.items() if record[0] != stat.S_IFIFO}


def test_a_tree_copied_out_keeps_everything(tree: Path, restore_dir: Path) -> None:
    manifest(tree)  # settles the links' atimes (see manifest)
    before = manifest(tree)
    report = copy_out(
        [(tree, (name,)) for name in TOP_LEVEL],
        [restore_dir],
        str(restore_dir / "out"),
    )
    copied = manifest(restore_dir / "out")
    assert copied == {p: r for p, r in without_fifo(before).items() if p != "small.txt"}
    assert report.skipped == ["fifo"]
    assert report.symlinks == 4
    assert report.hard_links == 1
    # Sparse stays sparse: only the data extents were written.
    assert allocated(restore_dir / "out/sparse.bin") < 1 << 20
    assert report.bytes_written < LARGE + (1 << 20) + 50_000
    assert report.bytes_written > LARGE
    assert os.stat(restore_dir / "out/sparse.bin").st_size == SPARSE
    hard = [os.stat(restore_dir / "out/tree" / p).st_ino for p in ("hard1", "a/hard2")]
    assert hard[0] == hard[1]
    # Links are copied as links, never followed: not the host's /etc/passwd.
    assert os.readlink(restore_dir / "out/links/abs") == "/etc/passwd"
    assert (restore_dir / "out/tree" / ODD_NAME).read_bytes() == b"soup of the day\n"
    assert os.stat(restore_dir / "out/home/alice/bin/tool").st_mode & stat.S_ISUID
    assert [p.name for p in restore_dir.iterdir()] == ["out"]  # no staging left


def test_a_path_through_a_link_copies_what_it_names(tree: Path, restore_dir: Path) -> None:
    report = copy_out([(tree, ("links", "dir", "a", ".."))], [restore_dir], str(restore_dir))
    assert (restore_dir / "tree" / "many" / "file00.txt").read_text() == "file 0\n"
    assert report.files > 30


def test_the_file_system_root_is_copied_under_its_own_name(tree: Path, restore_dir: Path) -> None:
    manifest(tree)
    before = manifest(tree)
    copy_out([(tree, ())], [restore_dir], str(restore_dir))
    assert without_fifo(manifest(restore_dir / "fs")) == without_fifo(before)


def test_a_listing_pages_through_a_directory_in_name_order(tree: Path) -> None:
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = list_directory(tree, ("tree", "many"), limit=7, after=after)
        seen += [entry.name for entry in page.entries]
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == [f"file{i:02d}.txt" for i in range(30)]
    assert pages == 5


def test_a_listing_shows_what_a_user_checks(tree: Path) -> None:
    listing = list_directory(tree, ())
    entries = {entry.name: entry for entry in listing.entries}
    assert entries["large.bin"].type == "file"
    assert entries["large.bin"].size == LARGE
    assert entries["fifo"].type == "fifo"
    assert entries["links"].type == "dir"
    alice = {e.name: e for e in list_directory(tree, ("home", "alice")).entries}
    assert (alice["notes.txt"].uid, alice["notes.txt"].gid) == (1000, 1000)
    assert alice["notes.txt"].mode == 0o640
    assert alice["bin"].type == "dir"
    links = {e.name: e for e in list_directory(tree, ("links",)).entries}
    assert (links["abs"].type, links["abs"].target) == ("symlink", "/etc/passwd")
    # A path naming a file lists that file.
    one = list_directory(tree, ("etc", "hosts"))
    assert [e.name for e in one.entries] == ["hosts"]
    assert one.next_after is None


def test_paths_resolve_inside_the_tree_only(tree: Path) -> None:
    # A link to a directory is followed, inside the tree.
    assert "many" in {e.name for e in list_directory(tree, ("links", "dir")).entries}
    # `..` stops at the root; an absolute link starts again at the root, not the host's /.
    assert {e.name for e in list_directory(tree, ("..", "..", "etc")).entries} == {
        "hosts",
        "secret.conf",
    }
    with pytest.raises(NotFound):
        list_directory(tree, ("links", "abs"))  # /etc/passwd of the tree: there is none
    with pytest.raises(NotFound):
        list_directory(tree, ("no", "such"))
    # A path ending in `..` names the directory it reaches.
    assert {e.name for e in list_directory(tree, ("tree", "a", "..")).entries} >= {"many", "a"}
    with pytest.raises(InvalidArgument):
        list_directory(tree, (), limit=0)


def test_destinations_outside_restore_dirs_are_refused(
    tree: Path, restore_dir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for target in (str(elsewhere), "relative/path", f"{restore_dir}/../elsewhere"):
        with pytest.raises(PathNotAllowed):
            copy_out([(tree, ("etc",))], [restore_dir], target)
    # A link planted in a restore directory does not send the copy elsewhere.
    os.symlink(elsewhere, restore_dir / "planted")
    with pytest.raises(RestoreTargetFailed):
        copy_out([(tree, ("etc",))], [restore_dir], str(restore_dir / "planted"))
    with pytest.raises(RestoreTargetFailed):
        copy_out([(tree, ("etc",))], [restore_dir], str(restore_dir / "planted" / "deeper"))
    assert list(elsewhere.iterdir()) == []


def test_an_existing_name_is_refused_before_anything_is_written(
    tree: Path, restore_dir: Path
) -> None:
    (restore_dir / "hosts").write_text("mine")
    with pytest.raises(RestoreTargetExists):
        copy_out(
            [(tree, ("etc", "secret.conf")), (tree, ("etc", "hosts"))],
            [restore_dir],
            str(restore_dir),
        )
    assert sorted(p.name for p in restore_dir.iterdir()) == ["hosts"]
    assert (restore_dir / "hosts").read_text() == "mine"
    with pytest.raises(InvalidArgument):
        copy_out([(tree, ("etc",)), (tree, ("etc",))], [restore_dir], str(restore_dir / "x"))


def test_a_copy_stopped_midway_leaves_nothing(tree: Path, restore_dir: Path) -> None:
    class Stop(Exception):
        pass

    def progress(nbytes: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        copy_out(
            [(tree, ("etc",)), (tree, ("large.bin",))],
            [restore_dir],
            str(restore_dir),
            progress=progress,
        )
    assert list(restore_dir.iterdir()) == []
