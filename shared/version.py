"""The version of Coffer that is running, as its agents and controller report it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def coffer_version() -> str:
    try:
        return version("coffer")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
