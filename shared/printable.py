"""Untrusted names made safe to show: file names from a recovery point, as people read them.

A file system a VM wrote can name a file with any bytes but `/` and NUL: bytes that are not
UTF-8, newlines, and terminal escape sequences that would rewrite an operator's screen. What
is shown of such a name writes every byte that is not UTF-8 as `\\xNN`, every character that
is not printable as `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN` (as `ls -b` and Python do), and a
backslash as `\\\\`, so the text shown names one file only and prints as the characters it is
made of. The raw bytes travel beside it wherever a program needs them.
"""

from __future__ import annotations

import os

_SURROGATES = range(0xDC80, 0xDD00)  # os.fsdecode's stand-ins for bytes that are not UTF-8


def shown(raw: bytes | str) -> str:
    """`raw` (bytes, or a str as `os.fsdecode` gives it) as text safe to print."""
    text = os.fsdecode(raw)
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        code = ord(char)
        if code in _SURROGATES:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)
