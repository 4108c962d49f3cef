"""Key and certificate files on disk: written atomically, private, and replaced as a pair.

Every file is written to a temporary file in its directory, synced, and linked or renamed
into place, then the directory is synced: a reader sees the old file or the new one, never
part of one, and a returned write survives a crash.

A renewed certificate and its new key are two files, which no rename replaces together. So
`install_pair` writes both beside the old ones first (`<name>.next`), then renames the key and
then the certificate into place; `recover_pair`, run before the pair is read, finishes an
install a crash interrupted (both `.next` files written: rename them; only the certificate's
left: the key is in place, rename it too) or drops one that never completed (only the key's).
The holder therefore never starts with a key that does not belong to its certificate.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700
NEXT_SUFFIX = ".next"


def write_file(path: Path, data: bytes, *, mode: int, replace: bool = True) -> None:
    """Write `path` atomically with `mode`; with replace=False, FileExistsError if it exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # os.open's mode went through the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _next(path: Path) -> Path:
    return path.with_name(path.name + NEXT_SUFFIX)


def install_pair(cert: Path, key: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Replace the certificate at `cert` and its key at `key` so that a crash at any point
    leaves the old pair or the new one (after `recover_pair`)."""
    write_file(_next(key), key_pem, mode=PRIVATE_MODE)
    write_file(_next(cert), cert_pem, mode=PUBLIC_MODE)
    os.replace(_next(key), key)
    os.replace(_next(cert), cert)
    sync_directory(cert.parent)
    if key.parent != cert.parent:
        sync_directory(key.parent)


def recover_pair(cert: Path, key: Path) -> bool:
    """Finish or undo an `install_pair` a crash interrupted; True if there was one."""
    next_cert, next_key = _next(cert), _next(key)
    if next_cert.exists():
        if next_key.exists():
            os.replace(next_key, key)
        os.replace(next_cert, cert)
    elif next_key.exists():
        next_key.unlink()  # the new certificate was never written: the old pair stands
    else:
        return False
    sync_directory(cert.parent)
    return True
