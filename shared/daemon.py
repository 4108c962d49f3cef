"""How Coffer's long-running processes start: options, logging, a config, typed failure."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from shared.errors import CofferError, find_coffer_error
from shared.logs import FORMATS, configure
from shared.version import coffer_version

C = TypeVar("C")


def run_daemon(
    prog: str,
    description: str | None,
    load: Callable[[Path], C],
    serve: Callable[[C], Coroutine[Any, Any, None]],
    argv: list[str] | None = None,
) -> int:
    """Parse `--config`, `--log-level` and `--log-format` (`--version` prints the version),
    load the config, serve; the process's exit code.

    A CofferError (a bad config, a port in use...) is one line on stderr and its exit code,
    not a traceback.
    """
    _limit_malloc_arenas()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, required=True, help="TOML configuration file")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text lines, or one JSON object per line (default: text)",
    )
    add_version(parser, prog)
    args = parser.parse_args(argv)
    configure(args.log_level, args.log_format)
    try:
        asyncio.run(serve(load(args.config)))
    except (CofferError, BaseExceptionGroup) as exc:
        error = find_coffer_error(exc)
        if error is None:
            raise
        print(f"{prog}: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def leave(code: int) -> NoReturn:
    """Exit with `code` now, logs and output flushed, without the interpreter's teardown.

    Call it only once everything the process owns is closed: what is left is memory, which the
    kernel frees at once and the interpreter object by object. For the CLI that teardown
    (freeing every module, stopping gRPC's threads) was 0.08-0.1 s after each command had
    finished; for a controller that had held 10,000 agent sessions it was 12-15 s of the
    cyclic collector and protobuf's arenas freeing each session's objects (issue 13), during
    which the restarted controller could not yet start and the fleet dialled a closed port.
    """
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # the reader went away: as the interpreter exits when it cannot flush
        code = code or 120
    os._exit(code)


def add_version(parser: argparse.ArgumentParser, prog: str) -> None:
    """`--version`: the program's name and Coffer's version, then exit."""
    parser.add_argument("--version", action="version", version=f"{prog} {coffer_version()}")


M_ARENA_MAX = -8  # <malloc.h>
MALLOC_ARENAS = 1


def _limit_malloc_arenas() -> None:
    """One malloc arena instead of glibc's eight per core.

    Chunks are allocated and freed by a dozen threads; with an arena each, every arena keeps
    its own freed MiB-sized blocks. Measured on the benchmark's restore: peak RSS 136-183 MiB
    (agent) and 161 MiB (controller) with two arenas instead of 254 and 213 with glibc's
    default; one arena (issue 11) took another 5-9 MiB off each side's backup and restore,
    at no measurable cost in CPU (the threads that allocate chunks mostly hold the GIL
    anyway). Only glibc has mallopt; elsewhere this does nothing.

    Not also a fixed M_MMAP_THRESHOLD below the chunk size (issue 11 tried 128 KiB): it cut
    peak RSS by 7-18 MiB, but every chunk-sized block was then a fresh mapping, its pages
    faulted in and zeroed: 17x the CPU of a 512 KiB copy (3000 copies: 0.94 s against
    0.06 s), a second of CPU per side in a 2 GiB backup.
    """
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
