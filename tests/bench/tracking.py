"""The tracking incremental: file edits inside an ext4 image on a reflink XFS, backed up by
Coffer with changed-block tracking, by Coffer reading in full, and by borg, in one run.

    python -m tests.bench.tracking --size 2G --seed 1 [--mix 0] [--workdir DIR] [--json FILE]

`--mix 1` takes the second image's mix of file kinds, as `tests.bench.run` does for its second
seed (`--seed 7 --mix 1` is the run's second tracking row).

The image is built on a loop-mounted XFS made with reflink=1, and cloned (sharing every
extent) for the full-reading Coffer, so both Coffers back up the same bytes without sharing a
kept clone. Each tool takes a full backup, the same file edits are made inside both images'
ext4 (`tests.bench.image.edit_files`: appends, overwrites, rewrites, new files, deletes; the
same seed gives the same edits), and each takes an incremental, from a dropped page cache:

- `coffer-tracking`: the vault's default `full_read_days` (7): the incremental compares the
  kept clone's extent map with the new clone's and reads only the changed chunks;
- `coffer-full-read`: `--full-read-days 0`: the incremental reads and hashes every chunk;
- `borg`: borg 1.2 with the project's peer settings (`tests.bench.peers`).

Printed: wall and CPU seconds, bytes the agent read (Coffer's job), bytes added to the
repository, and borg's time over the tracking incremental's (the issue asks for at least 10x).
The tracking incremental is restored and compared with the image. For the main table
(`tests.bench.run`), the "tracking incremental" row is this module's `coffer-tracking`
incremental; `Coffer.last_job["details"]["reads"]["root"]` says how the disk was read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bench.coffer import VAULT, Coffer
from tests.bench.image import Mix, build_image, edit_files, have_root_tools
from tests.bench.measure import StepFailed, StepResult, drop_caches, parse_size, sha256_file
from tests.bench.peers import Borg
from tests.loopfs import loop_fs

MiB = 1 << 20


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("2G"))
    parser.add_argument("--fill", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.02, help="of the file data edited")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument(
        "--mix", type=int, default=0, help="the mix of file kinds: tests.bench.run.MIXES[N]"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_args(argv)


def reads(tool: Coffer) -> dict[str, Any]:
    found: dict[str, Any] = tool.last_job.get("details", {}).get("reads", {}).get("root", {})
    return found


def run(args: argparse.Namespace, work: Path, mix: Mix | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # Room for the image, its clone's divergence and the kept clones' (sparse: costs little).
    with loop_fs(work / "xfs.img", "xfs", 2 * args.size + 1024 * MiB) as xfs:
        image = build_image(
            xfs.mountpoint / "vm.img", args.size, fill=args.fill, seed=args.seed, mix=mix
        )
        twin = xfs.mountpoint / "vm-full.img"
        subprocess.run(["cp", "--reflink=always", str(image.path), str(twin)], check=True)
        tracking = Coffer(work / "coffer-tracking", image.path, before_step=drop_caches)
        tracking.name = "coffer-tracking"
        full_read = Coffer(work / "coffer-full-read", twin, before_step=drop_caches)
        full_read.name = "coffer-full-read"
        borg = Borg(work / "borg", image.path, before_step=drop_caches)
        try:
            for tool in (tracking, full_read, borg):
                tool.setup()
            full_read._cli_plain(["vault", "update", VAULT, "--full-read-days", "0"])
            for tool in (tracking, full_read, borg):
                rows.append(_row(tool, tool.backup("full")))
            for path in (image.path, twin):
                edit_files(path, args.fraction, args.seed + 3)
            for tool in (tracking, full_read, borg):
                rows.append(_row(tool, tool.backup("incr-file-edits")))
            _, target = tracking.restore("restore-tracking")
            if sha256_file(target) != sha256_file(image.path):
                raise StepFailed("the tracking incremental restored other bytes than the image")
            target.unlink()
        finally:
            for closing in (tracking, full_read):
                closing.close()
            borg.close()
    return rows


def _row(tool: Coffer | Borg, result: StepResult) -> dict[str, Any]:
    row = result.as_dict()
    if isinstance(tool, Coffer):
        row["reads"] = reads(tool)
    return row


def report(rows: list[dict[str, Any]]) -> None:
    print(f"{'tool':18} {'step':16} {'wall s':>7} {'CPU s':>7} {'read MiB':>9} {'added MiB':>9}")
    for row in rows:
        read = row.get("reads", {}).get("bytes_read")
        shown = f"{int(read) / MiB:9.1f}" if read is not None else f"{'-':>9}"
        print(
            f"{row['tool']:18} {row['step']:16} {row['wall_s']:7.2f} {row['cpu_s']:7.2f} "
            f"{shown} {row['added_bytes'] / MiB:9.1f}"
        )
    incr = {r["tool"]: r for r in rows if r["step"] == "incr-file-edits"}
    tracked = incr["coffer-tracking"]
    how = tracked.get("reads", {})
    print(
        f"tracking incremental: "
        f"{'changed blocks only' if how.get('changed_blocks') else 'in full: ' + str(how)}; "
        f"borg / tracking: {incr['borg']['wall_s'] / tracked['wall_s']:.1f}x; "
        f"full read / tracking: {incr['coffer-full-read']['wall_s'] / tracked['wall_s']:.1f}x"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    if not have_root_tools():
        print(
            "run as root: the image needs losetup, mount, mkfs.xfs and mkfs.ext4", file=sys.stderr
        )
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="coffer-tracking-bench-", dir=args.workdir))
    started = time.monotonic()
    try:
        from tests.bench.run import MIXES  # here: tests.bench.run imports this module

        rows = run(args, work, mix=MIXES[args.mix % len(MIXES)])
        report(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    except StepFailed as failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        print(f"(the whole run took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
