"""Fixtures shared by test modules: a SeaweedFS S3 server for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.seaweed import SeaweedFS, start_seaweedfs

TEST_BUCKET = "coffer-tests"
"""One bucket for the session; each test works under its own prefix (its tmp_path's name)."""


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real SeaweedFS S3 server, started once per session and stopped by PID at its end,
    with the bucket TEST_BUCKET created."""
    with start_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        server.create_bucket(TEST_BUCKET)
        yield server
