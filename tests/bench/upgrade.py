"""The vault upgrade's rate: a 2 GiB VM's recovery points converted from format 1 to format 2.

    python -m tests.bench.upgrade [--size 2G] [--points 3] [--chunk-size 512K]
                                  [--workdir /var/tmp] [--keep] [--json FILE]

Run as root (the image is an ext4 file system built on a loop device; the page cache is
dropped before every step). It builds the benchmark's disk image (`tests.bench.image`: ext4
about 60% full of text, source, libraries, random data and zeros), starts a real controller
and agent (`tests.bench.coffer`) whose vault is format 1 (plain, as Coffer wrote before
encryption at rest), backs the image up `--points` times (a full backup, then incrementals
after 2% of the disk's blocks changed, scattered and in 256 KiB runs by turns), asks
`coffer vault upgrade --dry-run` for its estimate, then times `coffer vault upgrade` to its end
and restores the newest recovery point from the upgraded vault, checked byte-identical.

Printed: the plan (recovery points, chunks, stored bytes), the dry run's estimate, and the
upgrade's wall time, rate (stored MB read per second, chunks converted per second, disk data of
the recovery points per second) and the controller's peak RSS during it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bench.coffer import VAULT, Coffer, size_label
from tests.bench.image import (
    build_image,
    churn_clustered,
    churn_scatter,
    have_root_tools,
    loop_devices_for,
)
from tests.bench.measure import StepFailed, drop_caches, parse_size, sha256_file

MB = 1e6
MiB = 1 << 20


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.upgrade",
        description="Time `coffer vault upgrade` of a VM's recovery points (format 1 to 2).",
    )
    p.add_argument("--size", type=parse_size, default=parse_size("2G"), help="image size (2G)")
    p.add_argument("--points", type=int, default=3, help="recovery points to convert (3)")
    p.add_argument("--chunk-size", type=parse_size, default=512 << 10, help="chunk size (512K)")
    p.add_argument("--fill", type=float, default=0.6, help="file-system fill of the image (0.6)")
    p.add_argument("--seed", type=int, default=1, help="seed of the image and the churn (1)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"), help="parent (/var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the image, datastore and logs")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.points < 1:
        p.error("--points must be at least 1")
    return args


def cli_json(coffer: Coffer, *args: str) -> Any:
    return json.loads(coffer._cli_plain([*args, "--json"]))


def back_up(coffer: Coffer, image: Path, points: int, seed: int) -> list[str]:
    """`points` recovery points of the image: a full backup, then incrementals after churn."""
    made: list[str] = []
    for n in range(points):
        if n:
            churn = churn_scatter if n % 2 else churn_clustered
            changed = churn(image, seed=seed + n)
            print(f"  churned {changed / MiB:.1f} MiB ({churn.__name__})", flush=True)
        step = coffer.backup(f"backup-{n}")
        made.append(str(coffer.last_job["recovery_point_id"]))
        print(f"  backup {n}: {step.wall_s:.1f} s, {step.added_bytes / MiB:.1f} MiB added",
              flush=True)  # fmt: skip
    return made


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    image = work / "vm.img"
    print(f"building a {size_label(args.size)} image ...", flush=True)
    info = build_image(image, args.size, fill=args.fill, seed=args.seed)
    print(f"  {info.used_bytes / MiB:.0f} MiB used of {info.size_bytes / MiB:.0f} MiB", flush=True)
    coffer = Coffer(work / "coffer", image, chunk_size=args.chunk_size, before_step=drop_caches,
                    plain_vault=True)  # fmt: skip
    try:
        coffer.setup()
        if cli_json(coffer, "vault", "show", VAULT)["datastore_format"] != 1:
            raise StepFailed("the vault was not made format 1")
        print(f"{args.points} recovery points into a format-1 vault ...", flush=True)
        points = back_up(coffer, image, args.points, args.seed)
        image_sha = sha256_file(image)

        drop_caches()
        dry = cli_json(coffer, "vault", "upgrade", VAULT, "--dry-run")
        plan = dry["details"]["plan"]
        print(f"dry run: {json.dumps(plan)}", flush=True)

        job, step = coffer._measured("upgrade", ["vault", "upgrade", VAULT, "--json"])
        done = job["details"]["upgrade"]
        shown = cli_json(coffer, "vault", "show", VAULT)
        if (shown["datastore_format"], shown["upgrading_from_format"]) != (2, 0):
            raise StepFailed(f"the vault is not format 2 after the upgrade: {shown}")

        # The newest recovery point restores from the upgraded vault byte-identical.
        coffer.last_job = {"recovery_point_id": points[-1]}
        restored, target = coffer.restore("restore-upgraded")
        if sha256_file(target) != image_sha:
            raise StepFailed(f"the restore of {points[-1]} differs from the image")
        target.unlink()
    finally:
        coffer.close()

    seconds = step.wall_s
    figures: dict[str, Any] = {
        "image_bytes": info.size_bytes,
        "image_used_bytes": info.used_bytes,
        "chunk_size": args.chunk_size,
        "recovery_points": plan["recovery_points"],
        "chunks": plan["chunks"],
        "stored_bytes": plan["stored_bytes"],
        "dry_run_estimate_seconds": plan["estimated_seconds"],
        "dry_run_rate_mb_per_second": plan["rate_mb_per_second"],
        "upgrade_wall_seconds": round(seconds, 2),
        "upgrade_job_seconds": done["seconds"],
        "rate_mb_per_second": round(done["bytes_read"] / MB / seconds, 1),
        "chunks_per_second": round(done["chunks_converted"] / seconds, 1),
        "disk_mb_per_second": round(args.points * info.size_bytes / MB / seconds, 1),
        "peak_rss_controller_mib": round(step.detail["peak_rss_controller"] / MiB, 1),
        "cpu_seconds_controller": round(step.detail["cpu_s_controller"], 1),
        "restore_after_seconds": round(restored.wall_s, 2),
        "job": done,
    }
    return figures


def report(figures: dict[str, Any]) -> None:
    f = figures
    print()
    print(
        f"Upgrade of {f['recovery_points']} recovery points of a "
        f"{size_label(f['image_bytes'])} VM ({f['image_used_bytes'] / MiB:.0f} MiB used), "
        f"format 1 to 2, chunk size {size_label(f['chunk_size'])}:"
    )
    estimate = f"{f['dry_run_estimate_seconds']} s (at {f['dry_run_rate_mb_per_second']} MB/s)"
    rows = [
        ("chunks converted", f"{f['job']['chunks_converted']} of {f['chunks']}"),
        ("stored bytes read", f"{f['job']['bytes_read'] / MiB:.1f} MiB"),
        ("bytes written", f"{f['job']['bytes_written'] / MiB:.1f} MiB"),
        ("time (CLI, to the job's end)", f"{f['upgrade_wall_seconds']:.1f} s"),
        ("rate", f"{f['rate_mb_per_second']} MB/s stored, {f['chunks_per_second']} chunks/s"),
        ("disk data of the points", f"{f['disk_mb_per_second']} MB/s"),
        ("dry run's estimate", estimate),
        ("controller peak RSS", f"{f['peak_rss_controller_mib']} MiB"),
        ("controller CPU", f"{f['cpu_seconds_controller']} s"),
        ("restore of the newest point after", f"{f['restore_after_seconds']:.1f} s (identical)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    if not have_root_tools():
        print("run as root: building the image needs losetup, mount and mkfs.ext4", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="coffer-upgrade-bench-", dir=args.workdir))
    started = time.monotonic()
    try:
        figures = run(args, work)
        report(figures)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    except StepFailed as failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    finally:
        if loop_devices_for(work / "vm.img"):
            print("warning: a loop device is left on the image", file=sys.stderr)
        if args.keep:
            print(f"kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        print(f"(the whole run took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
