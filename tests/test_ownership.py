"""One controller owns its state directory and its port: a second one refuses to start.

Real `coffer-controller` processes (with their private Mosquitto) and the real CLI. A second
controller given the running one's `state_dir` must stop before it touches anything there,
naming the holder's PID; one given its `listen` must not share the port (gRPC turns
SO_REUSEPORT on by default, and the kernel would then deal connections to both).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from controller.state_lock import LOCK_NAME, StateLock
from shared.errors import StateDirInUse
from tests.cluster import BIN, Cluster, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def second_controller(cluster: Cluster, config: Path, *, state_dir: Path, port: int) -> Path:
    """A controller config like the cluster's, with its own `state_dir` and port."""
    config.write_text(
        f'listen = "127.0.0.1:{port}"\nstate_dir = "{state_dir}"\npki_dir = "{cluster.pki}"\n'
    )
    return config


def run_controller(config: Path) -> subprocess.CompletedProcess[str]:
    """Run a controller that is expected to refuse: it must exit by itself, quickly."""
    return subprocess.run(
        [str(BIN / "coffer-controller"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_controller_on_the_same_state_dir_refuses_and_names_the_first(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path / "first") as cluster:
        cluster.coffer("vault", "create", "v1", "--region", "eu")
        state = cluster.root / "state"
        broker_conf = state / "broker" / "mosquitto.conf"
        before = (broker_conf.read_text(), broker_conf.stat().st_mtime_ns)

        config = second_controller(
            cluster, tmp_path / "second.toml", state_dir=state, port=free_port()
        )
        result = run_controller(config)

        assert result.returncode == StateDirInUse.exit_code, result.stderr
        assert "ready" not in result.stdout
        assert f"in use by another coffer-controller (pid {cluster.controller.pid})" in (
            result.stderr
        )
        # Nothing of the first one's was touched: not its broker's configuration...
        assert (broker_conf.read_text(), broker_conf.stat().st_mtime_ns) == before
        # ...and it still serves, alone.
        assert [v["name"] for v in cluster.coffer("vault", "list")] == ["v1"]
        assert (state / LOCK_NAME).read_text().strip() == str(cluster.controller.pid)


def test_a_second_controller_on_the_same_port_refuses(tmp_path: Path) -> None:
    with Cluster(tmp_path / "first") as cluster:
        cluster.coffer("vault", "create", "v1", "--region", "eu")
        config = second_controller(
            cluster, tmp_path / "second.toml", state_dir=tmp_path / "state2", port=cluster.port
        )
        result = run_controller(config)

        assert result.returncode == 8, result.stderr
        assert "ready" not in result.stdout
        assert f"cannot listen on 127.0.0.1:{cluster.port}" in result.stderr
        assert "Is another controller running" in result.stderr
        # Every call reaches the first controller (with two, some would find no vault).
        for _ in range(10):
            assert [v["name"] for v in cluster.coffer("vault", "list")] == ["v1"]


def test_the_lock_names_its_holder_and_is_released_when_it_ends(tmp_path: Path) -> None:
    with StateLock(tmp_path) as held:
        # flock conflicts between two opens of the file, even in one process.
        with pytest.raises(StateDirInUse) as refused, StateLock(tmp_path):
            pass
        assert f"(pid {os.getpid()})" in str(refused.value)
        held.check()
    with StateLock(tmp_path):  # released on exit: taken again at once
        pass
