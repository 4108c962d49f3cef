"""Seeded contents for benchmark files: prose, source code, logs, libraries, random and zeros.

Every generator draws from one `random.Random`, so a seed gives the same bytes on every run
(the library kind copies this machine's own `.so` files, so it is the same per machine).

What each kind is meant to look like to a backup tool:

- ``prose``, ``code``, ``log``: text that zstd -3 shrinks about 3-4x (lz4 about 1.7x). Lines are
  drawn from pools of generated lines (words with a Zipf law over a made-up vocabulary), so
  repetition is at the scale of a line, as in real text, and never at the scale of a chunk:
  no two files share a run of bytes a deduplicating chunker (>= 4 KiB) could find.
- ``binary``: real shared libraries from /usr/lib (semi-compressible: zstd -3 about 2.7x),
  each used once; when they run out, or two are identical, a copy gets 16 new bytes in every
  4 KiB page (like a rebuilt version of the same library) so it never deduplicates against
  the original.
- ``random``: incompressible (media, archives, encrypted files).
- ``zeros``: written zeros (preallocated database and VM files): allocated, not holes.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import random
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KINDS = ("prose", "code", "log", "binary", "random", "zeros")
TEXT_KINDS = ("prose", "code", "log")

PAGE = 4096
PIECE = 16 << 20  # largest piece a generator yields at once
_POOL_LINES = 1 << 16

# fmt: off
_SYLLABLES = (
    "ka", "to", "ri", "en", "al", "mo", "ser", "ver", "con", "ta", "lin", "dor", "pe", "is",
    "an", "qu", "ex", "um", "or", "ne", "st", "ch", "ph", "ra", "li", "de", "ma", "po", "ti",
    "un", "ba", "ce", "fi", "go", "hu", "je", "ko", "lu", "mi", "na", "os", "pu", "re", "si",
    "tu", "vo", "wa", "xi", "ye", "zo", "ar", "el", "in", "on", "ur",
)
# fmt: on

_EXTENSIONS = {
    ".txt": "prose",
    ".md": "prose",
    ".rst": "prose",
    ".html": "prose",
    ".py": "code",
    ".c": "code",
    ".h": "code",
    ".go": "code",
    ".js": "code",
    ".conf": "code",
    ".log": "log",
    ".so": "binary",
    ".jpg": "random",
    ".zst": "random",
    ".gz": "random",
    ".dat": "zeros",
    ".img": "zeros",
}


def kind_of(path: str | Path) -> str:
    """The content kind of a file named by `FileGen.relpath` (anything else counts as prose)."""
    name = Path(path).name
    if name.endswith(".so") or ".so." in name:
        return "binary"
    return _EXTENSIONS.get(Path(name).suffix, "prose")


@dataclass(frozen=True)
class SizeLaw:
    """Log-normal file sizes: median bytes, spread (sigma of ln), and clamps."""

    median: int
    sigma: float
    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        size = int(rng.lognormvariate(math.log(self.median), self.sigma))
        return max(self.low, min(self.high, size))


SIZE_LAWS = {
    "prose": SizeLaw(8 << 10, 1.2, 200, 2 << 20),
    "code": SizeLaw(6 << 10, 1.0, 100, 512 << 10),
    "log": SizeLaw(512 << 10, 1.2, 4 << 10, 32 << 20),
    "random": SizeLaw(1 << 20, 1.5, 16 << 10, 128 << 20),
    "zeros": SizeLaw(4 << 20, 1.2, 64 << 10, 256 << 20),
}


class FileGen:
    """Names and contents of benchmark files, all drawn from one seeded generator."""

    def __init__(self, seed: int, library_roots: tuple[str, ...] = ("/usr/lib",)) -> None:
        self.rng = random.Random(seed)
        self.vocab = self._vocabulary(9000)
        self._cum = list(itertools.accumulate(1.0 / (i + 1) for i in range(len(self.vocab))))
        self.idents = [
            "_".join(self.rng.choices(self.vocab[:3000], k=self.rng.choice((1, 2, 2, 3))))
            for _ in range(4000)
        ]
        self.pools = {
            "prose": [self._prose_line() for _ in range(_POOL_LINES)],
            "code": [self._code_line() for _ in range(_POOL_LINES)],
            "log": [self._log_message() for _ in range(_POOL_LINES // 2)],
        }
        self.libraries = LibrarySource(self.rng, library_roots)
        self._clock = 1_700_000_000.0

    # -- names -------------------------------------------------------------------------------

    def word(self) -> str:
        return self.rng.choices(self.vocab, cum_weights=self._cum, k=1)[0]

    def relpath(self, kind: str, serial: int) -> str:
        """A plausible path (relative to the file system root) for a file of `kind`.

        Directories come from small fixed sets, so files share directories as on a real
        system (a few thousand directories on a 2 GiB disk, not one per file).
        """
        r = self.rng
        v = self.vocab
        if kind == "prose":
            if r.random() < 0.5:
                return f"usr/share/doc/{r.choice(v[:300])}/{r.choice(v)}-{serial}.txt"
            ext = r.choice((".md", ".txt", ".rst", ".html"))
            topic = r.choice(v[:25])
            return f"home/user{r.randrange(4)}/Documents/{topic}/{r.choice(v)}-{serial}{ext}"
        if kind == "code":
            ext = r.choice((".py", ".py", ".c", ".h", ".go", ".js", ".conf"))
            project = f"{r.choice(v[:12])}{r.randrange(10)}"
            module = r.choice(v[:40])
            return f"srv/src/{project}/{module}/{r.choice(self.idents)}-{serial}{ext}"
        if kind == "log":
            service = r.choice(v[:40])
            return f"var/log/{service}/{service}-{serial}.log"
        if kind == "random":
            style = r.randrange(3)
            if style == 0:
                return f"home/user{r.randrange(4)}/Pictures/IMG_{serial:05d}.jpg"
            if style == 1:
                return f"var/backups/{r.choice(v)}-{serial}.tar.zst"
            return f"var/cache/{r.choice(v[:30])}/{r.choice(v)}-{serial}.gz"
        if kind == "zeros":
            return f"var/lib/{r.choice(v[:50])}/{r.choice(v)}-{serial}.dat"
        raise ValueError(f"no path for kind {kind!r}")

    # -- contents ----------------------------------------------------------------------------

    def size_for(self, kind: str) -> int:
        return SIZE_LAWS[kind].draw(self.rng)

    def pieces(self, kind: str, size: int) -> Iterator[bytes]:
        """The contents of a new file of `kind`, `size` bytes, in pieces of at most 16 MiB."""
        if kind in TEXT_KINDS:
            left = size
            while left > 0:
                piece = self.text(kind, min(left, PIECE))
                left -= len(piece)
                yield piece
        elif kind == "random":
            yield from self.random_pieces(size)
        elif kind == "zeros":
            left = size
            while left > 0:
                n = min(left, PIECE)
                left -= n
                yield bytes(n)
        elif kind == "binary":
            yield self.libraries.take(size)[1]
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def text(self, kind: str, size: int) -> bytes:
        """`size` bytes of text of `kind` (prose, code or log), ending mid-line if it must."""
        pool = self.pools[kind]
        count = size // 40 + 2
        if kind == "log":
            data = b"".join(self._log_lines(pool, count))
        else:
            data = b"".join(self.rng.choices(pool, k=count))
        while len(data) < size:
            data += b"".join(self.rng.choices(pool, k=count))
        return data[:size]

    def random_pieces(self, size: int) -> Iterator[bytes]:
        left = size
        while left > 0:
            n = min(left, PIECE)
            left -= n
            yield self.rng.randbytes(n)

    # -- generators of the pools -------------------------------------------------------------

    def _vocabulary(self, n: int) -> list[str]:
        r = self.rng
        words: dict[str, None] = {}
        while len(words) < n:
            words["".join(r.choices(_SYLLABLES, k=r.choice((1, 1, 2, 2, 2, 3, 3, 4))))] = None
        return list(words)

    def _words(self, k: int) -> list[str]:
        return self.rng.choices(self.vocab, cum_weights=self._cum, k=k)

    def _prose_line(self) -> bytes:
        r = self.rng
        words = self._words(r.randint(5, 15))
        words[0] = words[0].capitalize()
        line = " ".join(words)
        if r.random() < 0.3:
            cut = r.randrange(1, len(words))
            line = " ".join(words[:cut]) + ", " + " ".join(words[cut:])
        end = r.choice((".", ".", ".", "?", ":", ""))
        if r.random() < 0.08:
            return f"\n## {line}\n\n".encode()
        return f"{line}{end}\n".encode()

    def _code_line(self) -> bytes:
        r = self.rng
        ids = self.idents
        a, b, c = r.choice(ids), r.choice(ids), r.choice(ids)
        indent = " " * (4 * r.choice((0, 1, 1, 2, 2, 2, 3, 3, 4)))
        n = r.choice((0, 1, 2, 8, 16, 64, 255, 1024, r.randrange(100000)))
        template = r.randrange(14)
        if template == 0:
            line = f"def {a}({b}, {c}={n}):"
        elif template == 1:
            line = f"{a} = {b}.{c}({r.choice(ids)}, {n})"
        elif template == 2:
            line = f"if ({a} != NULL && {b}->{c} > {n}) {{"
        elif template == 3:
            line = f"return {a}({b}, {c});"
        elif template == 4:
            line = f"# {' '.join(self._words(r.randint(3, 10)))}"
        elif template == 5:
            line = f"static int {a}(struct {b} *{c}, size_t len)"
        elif template == 6:
            line = f"for {a} in range({b}, len({c})):"
        elif template == 7:
            line = f'{a}_{n} = "{" ".join(self._words(r.randint(1, 5)))}"'
        elif template == 8:
            line = f"}} else if ({a} == {n}) {{"
        elif template == 9:
            line = f"import {a}" if r.random() < 0.5 else f"#include <{a}/{b}.h>"
        elif template == 10:
            line = f"self.{a} = {b}"
        elif template == 11:
            line = f"{a} = {b}.get({c!r}, {n})"
        elif template == 12:
            line = f"// {' '.join(self._words(r.randint(3, 12)))}"
        else:
            line = "}" if r.random() < 0.5 else ""
            indent = indent[:4]
        return f"{indent}{line}\n".encode()

    def _log_message(self) -> bytes:
        r = self.rng
        service = r.choice(self.vocab[:40])
        level = r.choice(("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"))
        words = " ".join(self._words(r.randint(3, 12)))
        extra = r.choice(("", f" id={r.randrange(1 << 32):08x}", f" took {r.randrange(5000)}ms"))
        pid = r.randrange(100, 40000)
        return f"host{r.randrange(8)} {service}[{pid}]: {level} {words}{extra}\n".encode()

    def _log_lines(self, pool: list[bytes], count: int) -> Iterator[bytes]:
        r = self.rng
        clock = self._clock
        for message in r.choices(pool, k=count):
            clock += r.expovariate(2.0)
            whole = int(clock)
            yield b"%d.%03d " % (whole, int((clock - whole) * 1000)) + message
        self._clock = clock


class LibrarySource:
    """Shared libraries of this machine, each handed out once, then rebuilt-looking copies."""

    def __init__(self, rng: random.Random, roots: tuple[str, ...]) -> None:
        self.rng = rng
        entries: list[tuple[Path, int]] = []
        seen_inodes: set[tuple[int, int]] = set()
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    if not (name.endswith(".so") or ".so." in name):
                        continue
                    path = Path(dirpath, name)
                    try:
                        st = path.lstat()
                    except OSError:
                        continue
                    if not stat.S_ISREG(st.st_mode) or st.st_size < 16 << 10:
                        continue
                    if (st.st_dev, st.st_ino) in seen_inodes:
                        continue
                    seen_inodes.add((st.st_dev, st.st_ino))
                    entries.append((path, st.st_size))
        rng.shuffle(entries)
        self._unused = entries
        self._used: list[Path] = []
        self._digests: set[bytes] = set()

    def take(self, max_size: int) -> tuple[str, bytes]:
        """(file name, contents) of a library of at most `max_size` bytes, never one seen before.

        The first unused library that fits; failing that, the next one cut to `max_size`;
        once all are used, a rebuilt copy of a used one.
        """
        while self._unused:
            index = next((i for i, (_, n) in enumerate(self._unused) if n <= max_size), 0)
            path, _ = self._unused.pop(index)
            try:
                data = path.read_bytes()[:max_size]
            except OSError:
                continue
            self._used.append(path)
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if digest in self._digests:
                return path.name, self.rebuild(data)
            self._digests.add(digest)
            return path.name, data
        if self._used:
            path = self.rng.choice(self._used)
            return path.name, self.rebuild(path.read_bytes()[:max_size])
        return "libsynthetic.so", self.synthetic(max_size)

    def rebuild(self, data: bytes) -> bytes:
        """`data` with 16 new bytes in each 4 KiB page: same shape, no chunk in common."""
        out = bytearray(data)
        r = self.rng
        for page in range(0, len(out), PAGE):
            span = min(PAGE, len(out) - page)
            if span <= 16:
                continue
            at = page + r.randrange(span - 16)
            out[at : at + 16] = r.randbytes(16)
        return bytes(out)

    def synthetic(self, size: int) -> bytes:
        """Library-like bytes when the machine has none: code-like noise, tables, strings, pad."""
        r = self.rng
        out = bytearray()
        while len(out) < size:
            style = r.random()
            if style < 0.4:
                out += r.randbytes(PAGE)
            elif style < 0.7:
                record = r.randbytes(4) + bytes(4)
                out += (record * (PAGE // 8))[:PAGE]
            elif style < 0.9:
                out += (" ".join(r.choices(_SYLLABLES, k=1500)).encode() + b"\0")[:PAGE]
            else:
                out += bytes(PAGE)
        return bytes(out[:size])
