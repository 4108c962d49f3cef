"""The peers Coffer is measured against: restic and borg, each backing up the disk image file.

Each peer backs up one path (the image file) into its own repository in a temporary
directory; every incremental is the same path with new contents (a new snapshot of the same
file, the parent found by path), and the restore writes the latest snapshot to a new file.

Settings, all the tools' defaults unless `compression="zstd"` is asked for:

- restic: repository format 2 (the default of 0.14+), always encrypted (AES-256-CTR +
  Poly1305; restic has no way to turn that off), `--compression auto` (zstd, fastest level),
  content-defined chunks of 512 KiB - 8 MiB (1 MiB average). `zstd` changes nothing: restic's
  default is zstd already.
- borg 1.2: `borg init --encryption=none` (as Coffer stores chunks unencrypted), compression
  `lz4` (borg's default) or `zstd,3` with `compression="zstd"`, buzhash chunks 512 KiB - 8 MiB
  (2 MiB average).

Client-side caches (restic's, borg's chunk and files caches) live in the peer's directory and
are not counted in the repository bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.bench.measure import (
    ChildRun,
    StepFailed,
    StepResult,
    allocated_bytes,
    run_child,
)
from tests.bench.single_file import SmallFile, through_mount

PASSWORD = "coffer-bench"  # restic cannot run unencrypted; the key is not what is measured


def _nothing() -> None:
    return None


class _Peer:
    """What restic and borg share: a repository directory, a log, measured child runs."""

    name = "peer"
    version_argv: tuple[str, ...] = ()

    def __init__(
        self,
        workdir: Path,
        source: Path,
        *,
        compression: str = "default",
        before_step: Callable[[], None] = _nothing,
        timeout_s: float = 3600.0,
    ) -> None:
        if compression not in ("default", "zstd"):
            raise ValueError(f"compression must be 'default' or 'zstd', not {compression!r}")
        self.dir = workdir
        self.source = source
        self.compression = compression
        self.before_step = before_step
        self.timeout_s = timeout_s
        self.repo = workdir / "repo"
        self.home = workdir / "home"
        self.restore_dir = workdir / "restore"
        self.log = workdir / "log.txt"

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def version(self) -> str:
        done = subprocess.run(self.version_argv, capture_output=True, text=True, check=True)
        return done.stdout.strip()

    def _check(self, run: ChildRun, what: str) -> None:
        if run.returncode != 0:
            raise StepFailed(f"{self.name} {what}: exit {run.returncode}\n{run.tail()}")

    def _plain(self, argv: list[str], what: str, cwd: Path | None = None) -> ChildRun:
        run = run_child(argv, self.log, env=self.env, cwd=cwd, timeout_s=self.timeout_s)
        self._check(run, what)
        return run

    def _measured(self, step: str, argv: list[str], cwd: Path | None = None) -> StepResult:
        before = allocated_bytes(self.repo)
        image_bytes = self.source.stat().st_size
        self.before_step()
        run = run_child(argv, self.log, env=self.env, cwd=cwd, timeout_s=self.timeout_s)
        self._check(run, step)
        after = allocated_bytes(self.repo)
        return StepResult(
            tool=self.name,
            step=step,
            image_bytes=image_bytes,
            wall_s=run.wall_s,
            cpu_s=run.cpu_s,
            peak_rss=run.max_rss,
            repo_bytes=after,
            added_bytes=after - before,
        )

    def _file_through_mount(
        self, step: str, file: SmallFile, argv: list[str], image_in: Callable[[Path], Path]
    ) -> StepResult:
        """One file of the latest snapshot through the tool's FUSE mount of the repository
        (tests.bench.single_file)."""
        destination = self.restore_dir / step
        shutil.rmtree(destination, ignore_errors=True)
        self.before_step()
        return through_mount(
            self.name,
            argv,
            self.env,
            image_in,
            file,
            self.source.stat().st_size,
            destination,
            self.log,
            self.timeout_s,
        )

    def _restored(self) -> Path:
        """Where the tool put the restored image (it recreates the source's absolute path)."""
        return self.restore_dir / self.source.resolve().relative_to("/")

    def close(self) -> None:
        return None


class Restic(_Peer):
    """restic: encrypted, zstd-compressed, content-defined chunks."""

    name = "restic"
    version_argv = ("restic", "version")

    @property
    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            RESTIC_REPOSITORY=str(self.repo),
            RESTIC_PASSWORD=PASSWORD,
            RESTIC_CACHE_DIR=str(self.home / "cache"),
        )

    def settings(self) -> str:
        config = self._repo_config()
        return (
            f"repository v{config.get('version', '?')}, AES-256+Poly1305 (always), "
            "--compression auto (zstd fastest, the default), CDC 0.5-8 MiB (avg 1 MiB)"
        )

    def _repo_config(self) -> dict[str, object]:
        done = subprocess.run(
            ["restic", "cat", "config"], env=self.env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            return {}
        config: dict[str, object] = json.loads(done.stdout)
        return config

    def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._plain(["restic", "init"], "init")

    def backup(self, step: str) -> StepResult:
        argv = ["restic", "backup", "--host", "bench", "--tag", step, "--compression", "auto"]
        return self._measured(step, [*argv, str(self.source.resolve())])

    def restore(self, step: str) -> tuple[StepResult, Path]:
        shutil.rmtree(self.restore_dir, ignore_errors=True)
        self.restore_dir.mkdir(parents=True)
        argv = ["restic", "restore", "latest", "--host", "bench", "--target", str(self.restore_dir)]
        return self._measured(step, argv), self._restored()

    def get_file(self, step: str, file: SmallFile) -> StepResult:
        inside = self.source.resolve().relative_to("/")
        return self._file_through_mount(
            step, file, ["restic", "mount"], lambda mnt: mnt / "snapshots" / "latest" / inside
        )


class Borg(_Peer):
    """borg 1.2: unencrypted here, lz4 (default) or zstd,3, buzhash chunks."""

    name = "borg"
    version_argv = ("borg", "--version")

    @property
    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            BORG_REPO=str(self.repo),
            BORG_BASE_DIR=str(self.home),
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        )

    @property
    def _compression(self) -> list[str]:
        # Without -C borg 1.2 uses lz4; say nothing, so the default is what runs.
        return ["--compression", "zstd,3"] if self.compression == "zstd" else []

    def settings(self) -> str:
        compression = "zstd,3" if self.compression == "zstd" else "lz4 (the default)"
        return (
            f"--encryption=none, compression {compression}, "
            "buzhash CDC 0.5-8 MiB (avg 2 MiB, the default)"
        )

    def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._plain(["borg", "init", "--encryption=none"], "init")

    def backup(self, step: str) -> StepResult:
        argv = ["borg", "create", "--stats", *self._compression, f"::{step}"]
        return self._measured(step, [*argv, str(self.source.resolve())])

    def restore(self, step: str) -> tuple[StepResult, Path]:
        shutil.rmtree(self.restore_dir, ignore_errors=True)
        self.restore_dir.mkdir(parents=True)
        last = self._last_archive()
        argv = ["borg", "extract", "--sparse", f"::{last}"]
        return self._measured(step, argv, cwd=self.restore_dir), self._restored()

    def _last_archive(self) -> str:
        done = subprocess.run(
            ["borg", "list", "--last", "1", "--format", "{archive}{NL}"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    def get_file(self, step: str, file: SmallFile) -> StepResult:
        inside = self.source.resolve().relative_to("/")
        # -f: in the foreground, so that its reads are its own process's.
        argv = ["borg", "mount", "-f", f"::{self._last_archive()}"]
        return self._file_through_mount(step, file, argv, lambda mnt: mnt / inside)
