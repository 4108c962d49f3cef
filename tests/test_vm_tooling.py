"""The guest tooling's parts that need no guest: the mirror, the cache key, the accelerator
switch, files written into an ext4 image, and the journal application's records."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.vm import VmError
from deploy.vm.guest import accelerator, write_files
from deploy.vm.image import base_key, host_mirror, input_key
from deploy.vm.journal_app import check, record


def test_the_mirror_is_the_one_apt_uses(tmp_path: Path) -> None:
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert host_mirror([deb822]) == "http://mirror.example/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert host_mirror([one_line]) == "http://other.example/debian"
    empty = tmp_path / "none.list"
    empty.write_text("deb https://packages.example/apt stable main\n")
    with pytest.raises(VmError, match="no Debian bookworm mirror"):
        host_mirror([empty])


def test_cache_keys_follow_their_inputs() -> None:
    assert input_key("http://a/debian") == input_key("http://a/debian")
    assert input_key("http://a/debian") != input_key("http://b/debian")
    # The Debian tree's key does not depend on the agent's code, only on what mmdebstrap gets.
    assert base_key("http://a/debian") != base_key("http://b/debian")
    assert len(base_key("http://a/debian")) == 16


def test_the_accelerator_is_tcg_or_kvm_and_nothing_else() -> None:
    assert accelerator("tcg") == "tcg"
    assert accelerator("kvm") == "kvm"
    for bad in ("KVM", "hvf", "", "tcg,thread=multi"):
        with pytest.raises(VmError, match="is not one of tcg, kvm"):
            accelerator(bad)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("debugfs") is None, reason="needs debugfs")
def test_files_are_written_into_an_ext4_image_without_mounting_it(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    key = tmp_path / "agent.key"
    key.write_bytes(b"secret")
    key.chmod(0o600)
    write_files(image, {"/etc/coffer-agent/tls/agent.key": key, "/etc/hostname": b"web-1\n"})
    write_files(image, {"/etc/hostname": b"web-2\n"})  # written over
    shown = subprocess.run(["debugfs", "-R", "stat /etc/coffer-agent/tls/agent.key", str(image)],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "Mode:  0600" in shown
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(image)],
                         capture_output=True, check=True).stdout  # fmt: skip
    assert cat == b"web-2\n"
    subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, check=True)


def test_journal_records_are_counted_up_to_the_first_torn_or_wrong_one() -> None:
    journal = "".join(record(n) for n in range(1, 6))
    assert check(journal) == 5
    assert check(journal + record(6)[:-3]) == 5  # torn by a crash: not committed
    with pytest.raises(ValueError, match="record 3"):
        check(record(1) + record(2) + record(4))
