"""Pages of a listing: how many entries a page holds, and the token that names the next one.

A listing that can hold the fleet (agents, items, jobs) is read a page at a time in a stable
order (each ends with a unique column, the VM id or the job id, so no two entries tie). The
reply carries `next_page_token`, empty on the last page; the caller passes it back for the
next one. The token is opaque to callers: it holds the listing's name and the sort key of the
last entry sent, so the next page starts right after it whatever was added or removed
meanwhile (an entry added before it is not seen, one removed is not repeated). A token of
another listing, or one that is not a token at all, is refused with `InvalidArgument`.

A page holds `page_size` entries: 0 asks for `DEFAULT_PAGE_SIZE`, and more than
`MAX_PAGE_SIZE` is given `MAX_PAGE_SIZE` (a reply's size stays bounded whatever is asked).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

from shared.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000

Key = tuple[str | float, ...]


def page_size(requested: int) -> int:
    """The entries a page holds when `requested` are asked for."""
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def token(listing: str, key: Sequence[str | float]) -> str:
    """The token of the page after the entry whose sort key is `key`."""
    text = json.dumps([listing, *key], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def after(listing: str, page_token: str, kinds: Sequence[type]) -> Key | None:
    """The sort key a `page_token` of `listing` carries (None for the first page); each part
    of the kind `kinds` says. InvalidArgument for a token this listing did not give."""
    if not page_token:
        return None
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        decoded = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = None
    if (
        not isinstance(decoded, list)
        or len(decoded) != len(kinds) + 1
        or decoded[0] != listing
        or not all(_is(value, kind) for value, kind in zip(decoded[1:], kinds, strict=True))
    ):
        raise InvalidArgument(
            detail=f"page_token {page_token[:64]!r} is not one a {listing} listing gave; "
            "pass the next_page_token of the reply before, or none for the first page"
        )
    return tuple(decoded[1:])


def _is(value: object, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)
