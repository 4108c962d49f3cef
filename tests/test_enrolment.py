"""Enrolment tokens and the files a certificate is installed in (pure, no processes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.enrolment import PREFIX, EnrolmentToken, secret_matches
from shared.errors import EnrolmentTokenInvalid, InvalidArgument
from shared.keyfiles import install_pair, recover_pair

CA = "ab" * 32


def test_a_token_reads_back_as_it_was_made() -> None:
    token = EnrolmentToken.new("web-1.prod", CA)
    text = str(token)
    assert text.startswith(f"{PREFIX}:")
    assert EnrolmentToken.parse(text) == token
    assert EnrolmentToken.parse(f"  {text}\n") == token
    assert secret_matches(token.secret, token.secret_hash)
    assert not secret_matches(token.secret[::-1], token.secret_hash)
    assert token.secret not in token.secret_hash
    # Two tokens for one VM share nothing secret.
    other = EnrolmentToken.new("web-1.prod", CA)
    assert (other.token_id, other.secret) != (token.token_id, token.secret)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nonsense",
        f"{PREFIX}:0123456789abcdef:{'A' * 43}:{CA}",  # no VM
        f"coffer-enrol-2:0123456789abcdef:{'A' * 43}:{CA}:vm-1",  # another version
        f"{PREFIX}:0123456789ABCDEF:{'A' * 43}:{CA}:vm-1",  # id not lower-case hex
        f"{PREFIX}:0123456789abcdef:{'A' * 42}:{CA}:vm-1",  # short secret
        f"{PREFIX}:0123456789abcdef:{'A' * 43}:{'g' * 64}:vm-1",  # fingerprint not hex
        f"{PREFIX}:0123456789abcdef:{'A' * 43}:{CA}:VM/1",  # not a VM id
        f"{PREFIX}:0123456789abcdef:{'A' * 43}:{CA}:coffer-controller",  # reserved
        f"{PREFIX}:0123456789abcdef:{'A' * 43}:{CA}:vm-1:extra",
        f"{PREFIX}:0123456789abcdef:{'A' * 43}:{CA}:" + "a" * 300,  # too long
    ],
)
def test_what_is_not_a_token_is_refused(text: str) -> None:
    with pytest.raises(EnrolmentTokenInvalid):
        EnrolmentToken.parse(text)


def test_a_token_for_an_invalid_vm_cannot_be_made() -> None:
    with pytest.raises(InvalidArgument):
        EnrolmentToken.new("Not A VM", CA)


# --- a certificate and its key replaced together -------------------------------------------


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "agent.crt", tmp_path / "agent.key"
    install_pair(cert, key, b"old cert", b"old key")
    return cert, key


def test_a_pair_is_installed_with_a_private_key(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    install_pair(cert, key, b"new cert", b"new key")
    assert (cert.read_bytes(), key.read_bytes()) == (b"new cert", b"new key")
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.crt", "agent.key"]
    assert not recover_pair(cert, key)


def test_a_crash_before_the_new_certificate_was_written_leaves_the_old_pair(
    tmp_path: Path,
) -> None:
    cert, key = _pair(tmp_path)
    (tmp_path / "agent.key.next").write_bytes(b"new key")
    assert recover_pair(cert, key)
    assert (cert.read_bytes(), key.read_bytes()) == (b"old cert", b"old key")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.crt", "agent.key"]


def test_a_crash_with_both_new_files_written_installs_the_new_pair(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    (tmp_path / "agent.key.next").write_bytes(b"new key")
    (tmp_path / "agent.crt.next").write_bytes(b"new cert")
    assert recover_pair(cert, key)
    assert (cert.read_bytes(), key.read_bytes()) == (b"new cert", b"new key")


def test_a_crash_between_the_two_renames_installs_the_new_pair(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    key.write_bytes(b"new key")  # the key was renamed into place, the certificate not yet
    (tmp_path / "agent.crt.next").write_bytes(b"new cert")
    assert recover_pair(cert, key)
    assert (cert.read_bytes(), key.read_bytes()) == (b"new cert", b"new key")
