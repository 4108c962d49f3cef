"""Enrolment tokens: what an admin hands to a VM so that its agent can get a certificate.

A token is one line an admin copies into the VM:

    coffer-enrol-1:<id>:<secret>:<ca-sha256>:<vm id>

- `id`: 16 hex digits naming the token at the controller (which looks it up by them);
- `secret`: 32 random bytes, base64url; the controller keeps only its SHA-256, so its
  catalog cannot enrol anybody;
- `ca-sha256`: the SHA-256 fingerprint of the controller CA's certificate (64 hex digits). The
  agent has no CA yet: it takes the CA the enrolment listener presents only if its
  fingerprint is this one, and then verifies the listener's certificate against it (pinning);
- `vm id`: the VM the token enrols; the controller enrols no other with it.

The fields are separated by `:`, which neither base64url, hex nor a VM id contains. Expiry and
single use are the controller's record, not the token's word. This module is pure: it makes,
reads and checks the text; issuing is the controller's (`controller/enrolment.py`), using one
the agent's (`agent/enrolment.py`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

from shared.errors import EnrolmentTokenInvalid, InvalidArgument
from shared.tls import validate_vm_id

PREFIX: Final = "coffer-enrol-1"
SECRET_BYTES: Final = 32
# Bounds what the enrolment listener parses before it has checked anything.
MAX_TOKEN_LENGTH: Final = 256
_ID = re.compile(r"[0-9a-f]{16}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True)
class EnrolmentToken:
    token_id: str
    secret: str
    ca_fingerprint: str
    vm_id: str

    @classmethod
    def new(cls, vm_id: str, ca_fingerprint: str) -> EnrolmentToken:
        """A fresh token for VM `vm_id` that pins the CA with fingerprint `ca_fingerprint`."""
        secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=")
        return cls(
            token_id=secrets.token_hex(8),
            secret=secret.decode(),
            ca_fingerprint=ca_fingerprint,
            vm_id=validate_vm_id(vm_id),
        )

    def __str__(self) -> str:
        return ":".join((PREFIX, self.token_id, self.secret, self.ca_fingerprint, self.vm_id))

    @property
    def secret_hash(self) -> str:
        """What the controller stores instead of the secret."""
        return hash_secret(self.secret)

    @classmethod
    def parse(cls, text: str) -> EnrolmentToken:
        """The token `text` holds; EnrolmentTokenInvalid if it is not one."""
        text = text.strip()
        if len(text) > MAX_TOKEN_LENGTH:
            raise EnrolmentTokenInvalid(detail=f"it is longer than {MAX_TOKEN_LENGTH} characters")
        parts = text.split(":")
        if len(parts) != 5 or parts[0] != PREFIX:
            raise EnrolmentTokenInvalid(
                detail=f"it does not have the form {PREFIX}:ID:SECRET:CA-SHA256:VM"
            )
        _, token_id, secret, fingerprint, vm_id = parts
        if not _ID.fullmatch(token_id):
            raise EnrolmentTokenInvalid(detail="its id is not 16 hex digits")
        if not _SECRET.fullmatch(secret):
            raise EnrolmentTokenInvalid(detail="its secret is not 43 base64url characters")
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise EnrolmentTokenInvalid(detail="its CA fingerprint is not 64 hex digits")
        try:
            validate_vm_id(vm_id)
        except InvalidArgument as exc:
            raise EnrolmentTokenInvalid(detail=str(exc)) from None
        return cls(token_id, secret, fingerprint, vm_id)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Whether `secret` is the one whose hash was stored (in constant time)."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)
