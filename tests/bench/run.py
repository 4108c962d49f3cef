"""The benchmark run: Coffer, restic and borg on the same disk image, in the same run.

    python -m tests.bench.run [--size 2G] [--tools coffer,restic,borg] [--chunk-size 512K 1M]
                              [--seeds 1,7] [--workdir /var/tmp] [--keep] [--no-memory]
                              [--sparse-memory] ...

Run as root (loop mounts, dropping the page cache). Steps, for every tool in turn:

1. ``full``: the base image (ext4 about 60% full, see `tests.bench.image`);
2. ``incr-scatter``, ``incr-clustered``, ``incr-file-edits``: each churn variant *made from
   the base*, then placed at the same path as the next state of the disk and backed up as the
   next snapshot. Each incremental therefore measures exactly one kind of change of the stated
   size against a repository that already holds the base; changes do not pile up (with
   variants in sequence the last one would also carry the earlier ones), and the raw churns,
   which hit file-system metadata at random, never leave the file-edits variant unmountable.
   Going back from one variant to another is free for every tool: the base's chunks are in
   every repository;
3. ``restore``: the latest snapshot (the file-edits state) to a new file, checked
   byte-identical to the source by SHA-256, for every tool;
4. ``file-get``: one small file of the latest snapshot back, through `coffer files get`,
   `restic mount` and `borg mount` (`tests.bench.single_file`): seconds to the file written,
   bytes read from the repository, checked against the source file. A table of its own;
5. Coffer only, the ways back of a disk: ``restore-base-image`` restores the full backup's
   recovery point to a new image, and ``rollback-file-edits`` rolls the disk itself (in the
   file-edits state) back to that recovery point in place, fetching only the chunks that
   differ; the disk must then be byte-identical to the base. A table puts the two side by
   side: time, bytes compared, fetched and written (`--no-rollback` skips both).

Before every step of every tool the page cache is dropped (`sync; echo 3 >
/proc/sys/vm/drop_caches`), so every tool reads the image, and its repository, from disk
(`--no-drop-caches` keeps everything cached instead, for all tools alike).

Coffer runs once per `--chunk-size` (each its own controller, datastore and agent).

All of the above runs once per seed of `--seeds` (1,7), each with its own image, churn and
fresh tools; every seed after the first also takes another mix of file kinds (`MIXES`). Before
each seed's restores the machine's sequential write rate is measured (`dd` of the image's size,
`oflag=direct conv=fdatasync`), the restore's second bound. Each seed gets issue 11's table
(`tests.bench.report.issue_table`): Coffer against the faster peer, the issue's target for each
step and whether this run meets it, and the changed-block tracking incremental (step
``incr-tracking``: `tests.bench.tracking` on the seed's image and mix placed on a reflink XFS,
the same file edits backed up by Coffer with tracking and by borg; `--no-tracking` skips it).
Last, the memory rows: Coffer alone backs up and restores mostly-empty sparse images
(`--sparse-sizes`, 2 GiB and 32 GiB) with fresh installs, to show its memory does not grow with
the disk (`--no-memory` skips them). `--sparse-memory` instead
runs only sparse backups, of every tool.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.bench import tracking
from tests.bench.coffer import Coffer, size_label
from tests.bench.image import (
    Mix,
    build_image,
    build_sparse_image,
    churn_clustered,
    churn_scatter,
    copy_image,
    edit_files,
    have_root_tools,
    loop_devices_for,
)
from tests.bench.measure import (
    StepFailed,
    StepResult,
    Tool,
    drop_caches,
    parse_size,
    sequential_write_rate,
    sha256_file,
)
from tests.bench.peers import Borg, Restic
from tests.bench.report import (
    TRACKING_STEP,
    console,
    issue_table,
    memory_table,
    notes,
    rollback_table,
    single_file_table,
    steps_table,
)
from tests.bench.single_file import STEP as SINGLE_FILE
from tests.bench.single_file import pick_small_file

MIXES = (
    Mix(),
    # The second image: more incompressible data, less text, fewer zeros.
    Mix(prose=0.06, code=0.08, log=0.16, binary=0.25, random=0.35, zeros=0.10),
)
"""The file mix of each seed's image in turn: the first is the project's benchmark image."""


def parse_sizes(values: Sequence[str]) -> list[int]:
    return [parse_size(v) for value in values for v in value.split(",") if v.strip()]


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.run",
        description="Compare Coffer with restic and borg on the same disk image.",
    )
    p.add_argument("--size", type=parse_size, default=parse_size("2G"), help="image size (2G)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="parent of the run's own temporary directory (/var/tmp)",
    )
    p.add_argument(
        "--tools", default="coffer,restic,borg", help="comma-separated: coffer,restic,borg"
    )
    p.add_argument(
        "--chunk-size",
        nargs="+",
        default=["512K"],
        help="Coffer chunk size(s), one Coffer run per size (512K, the default of new "
        "datastores; e.g. --chunk-size 256K 512K 1M)",
    )
    p.add_argument("--keep", action="store_true", help="keep images, repositories and logs")
    p.add_argument("--fill", type=float, default=0.6, help="file-system fill of the base (0.6)")
    p.add_argument("--fraction", type=float, default=0.02, help="churn fraction (0.02)")
    p.add_argument("--run-bytes", type=parse_size, default=256 << 10, help="clustered run (256K)")
    p.add_argument(
        "--seeds",
        default="1,7",
        help="seeds of the images and their churn, one whole run each (1,7); every seed after "
        "the first also takes another mix of file kinds (MIXES), so the figures hold for data "
        "the code was not tuned on",
    )
    p.add_argument("--seed", type=int, help="one seed only (same as --seeds N)")
    p.add_argument(
        "--peer-compression",
        choices=("default", "zstd"),
        default="default",
        help="default: each peer's default (restic auto=zstd, borg lz4); zstd: borg zstd,3 too",
    )
    p.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="keep the page cache warm for every step instead of dropping it before each",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per step (3600)")
    p.add_argument(
        "--no-rollback",
        action="store_true",
        help="skip Coffer's full restore of the base and in-place rollback of the file edits",
    )
    p.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    p.add_argument(
        "--sparse-memory",
        action="store_true",
        help="instead: full backups of mostly-empty sparse images, to compare peak memory",
    )
    p.add_argument(
        "--sparse-sizes",
        default="2G,32G",
        help="sparse image sizes of the memory rows (2G,32G): a full backup and a restore each",
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the memory rows (Coffer's backup and restore of the sparse images)",
    )
    p.add_argument(
        "--no-tracking",
        action="store_true",
        help="skip the tracking incremental (Coffer with changed-block tracking against borg, "
        "on the image placed on a reflink XFS)",
    )
    p.add_argument(
        "--no-write-rate",
        action="store_true",
        help="skip measuring the machine's sequential write rate (the restore bound)",
    )
    p.add_argument(
        "--sparse-data",
        type=parse_size,
        default=64 << 20,
        help="data in each sparse image, the same for every size (64M)",
    )
    args = p.parse_args(argv)
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(args.tools) - {"coffer", "restic", "borg"}
    if unknown:
        p.error(f"unknown tools: {', '.join(sorted(unknown))}")
    args.chunk_size = parse_sizes(args.chunk_size)
    args.sparse_sizes = parse_sizes([args.sparse_sizes])
    args.seeds = [args.seed] if args.seed is not None else [int(s) for s in args.seeds.split(",")]
    if args.size % 4096:
        p.error("--size must be a multiple of 4 KiB")
    return args


class Bench:
    """One run: its directory, its tools, and what they measured."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.results: list[StepResult] = []
        self.notes: list[str] = []
        self.versions: dict[str, str] = {}
        self.settings: dict[str, str] = {}
        self.open_tools: list[Tool] = []
        self.seed: int | None = None  # the seed of the churn run under way, for notes
        self.write_rates: dict[int, float] = {}  # seed: bytes/s of a sequential write
        # Other work on the machine skews wall times: the report shows how busy it was.
        self.load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    def before_step(self) -> Callable[[], None]:
        return (lambda: os.sync()) if self.args.no_drop_caches else drop_caches

    def make_tools(self, where: Path, source: Path) -> list[Tool]:
        tools: list[Tool] = []
        a = self.args
        hook, timeout = self.before_step(), a.timeout
        if "coffer" in a.tools:
            for size in a.chunk_size:
                where_c = where / f"coffer-{size_label(size)}"
                tools.append(
                    Coffer(where_c, source, chunk_size=size, before_step=hook, timeout_s=timeout)
                )
        for name, peer in (("restic", Restic), ("borg", Borg)):
            if name in a.tools:
                tools.append(
                    peer(
                        where / name,
                        source,
                        compression=a.peer_compression,
                        before_step=hook,
                        timeout_s=timeout,
                    )
                )
        return tools

    def start(self, tools: list[Tool], steps: Sequence[str]) -> list[Tool]:
        """Set every tool up; a tool that cannot start fails all its steps and is dropped."""
        ready = []
        for tool in tools:
            try:
                self.open_tools.append(tool)
                tool.setup()
                self.versions.setdefault(tool.name.split("-")[0], tool.version())
                self.settings[tool.name] = tool.settings()
                ready.append(tool)
            except (StepFailed, OSError, ValueError) as exc:
                self.fail(tool, steps, f"setup: {exc}")
                tool.close()
        return ready

    def fail(self, tool: Tool, steps: Sequence[str], error: str) -> None:
        for step in steps:
            self.results.append(StepResult(tool.name, step, 0, 0.0, 0.0, 0, 0, 0, False, error))
        self.note(f"{tool.name}: {error.strip()}")

    def note(self, text: str) -> None:
        self.notes.append(f"seed {self.seed}: {text}" if self.seed is not None else text)

    def close(self) -> None:
        for tool in self.open_tools:
            tool.close()
        self.open_tools.clear()

    # -- the churn benchmark ---------------------------------------------------------------

    def churn(self) -> None:
        """The churn benchmark once per seed, each with fresh tools; every result and note is
        tagged with its seed."""
        for i, seed in enumerate(self.args.seeds):
            first = len(self.results)
            self.seed = seed
            self.churn_seed(seed, MIXES[i % len(MIXES)])
            if not self.args.no_tracking and {"coffer", "borg"} <= set(self.args.tools):
                self.tracking_seed(seed, MIXES[i % len(MIXES)])
            for result in self.results[first:]:
                result.detail["seed"] = seed

    def tracking_seed(self, seed: int, mix: Mix) -> None:
        """The tracking incremental (`tests.bench.tracking`) of this seed's image and mix: the
        same file edits backed up by Coffer with changed-block tracking and by borg, on an
        image on a reflink XFS. Its two incrementals are the table's TRACKING_STEP row."""
        a = self.args
        settings = argparse.Namespace(size=a.size, fill=a.fill, seed=seed, fraction=a.fraction)
        work = self.work / f"seed-{seed}" / "tracking"
        work.mkdir(parents=True)
        try:
            rows = tracking.run(settings, work, mix=mix)
        except StepFailed as exc:
            self.note(f"the tracking incremental failed: {exc}")
            return
        finally:
            if not a.keep:
                shutil.rmtree(work, ignore_errors=True)
        keep = {"coffer-tracking": "coffer-tracking", "borg": "borg"}
        names = {f.name for f in dataclasses.fields(StepResult)}
        for row in rows:
            if row["step"] == "incr-file-edits" and row["tool"] in keep:
                result = StepResult(**{k: v for k, v in row.items() if k in names})
                result.step = TRACKING_STEP
                result.detail["reads"] = row.get("reads", {})
                self.results.append(result)
        self._progress(TRACKING_STEP)

    def churn_seed(self, seed: int, mix: Mix) -> None:
        a = self.args
        work = self.work / f"seed-{seed}"
        images = work / "images"
        images.mkdir(parents=True)
        base = images / "base.img"
        disk = work / "disk" / "disk.img"
        disk.parent.mkdir()

        started = time.monotonic()
        info = build_image(base, a.size, fill=a.fill, seed=seed, mix=mix)
        kinds = ", ".join(f"{k} {n / (1 << 20):.0f}" for k, n in info.bytes_by_kind.items())
        self.note(
            f"image: {size_label(a.size)} raw, ext4 {info.used_bytes / info.fs_bytes:.0%} used "
            f"({info.used_bytes / (1 << 20):.0f} MiB), {info.files} files, seed {seed}; "
            f"MiB by kind: {kinds}; built in {time.monotonic() - started:.0f} s"
        )
        variants: list[tuple[str, Callable[[Path], str] | None]] = [
            ("full", None),
            (
                "incr-scatter",
                lambda p: (
                    f"{churn_scatter(p, a.fraction, seed + 1) / (1 << 20):.1f} MiB "
                    "in scattered 4 KiB blocks"
                ),
            ),
            (
                "incr-clustered",
                lambda p: (
                    f"{churn_clustered(p, a.fraction, a.run_bytes, seed + 2) / (1 << 20):.1f}"
                    f" MiB in {size_label(a.run_bytes)} runs"
                ),
            ),
            ("incr-file-edits", lambda p: _edits(p, a.fraction, seed + 3)),
        ]
        steps = [name for name, _ in variants] + ["restore"]
        tools = self.start(self.make_tools(work, disk), steps)

        for step, churn in variants:
            staging = images / "next.img"
            copy_image(base, staging)
            if churn is not None:
                self.note(f"{step}: {churn(staging)} (from the base)")
            os.replace(staging, disk)  # a new file at the same path: the disk's next state
            os.sync()
            for tool in list(tools):
                try:
                    self.results.append(tool.backup(step))
                except StepFailed as exc:
                    self.fail(tool, steps[steps.index(step) :], str(exc))
                    tools.remove(tool)
            self._progress(step)

        want = sha256_file(disk)
        if not a.no_write_rate:
            # The restore's bound: this machine writing an image of the same size, now.
            rate = sequential_write_rate(work / "write-rate.img", a.size)
            self.write_rates[seed] = rate
            self.note(
                f"sequential write rate: {rate / 1e6:.0f} MB/s (dd of {size_label(a.size)} of "
                "zeros, oflag=direct conv=fdatasync, into the workdir, just before the restores)"
            )
        for tool in tools:
            try:
                result, restored = tool.restore("restore")
            except StepFailed as exc:
                self.fail(tool, ["restore"], str(exc))
                continue
            got = sha256_file(restored) if restored.exists() else "missing"
            result.detail["sha256"] = got
            result.ok = got == want
            verdict = "identical" if result.ok else f"DIFFERS (sha256 {got[:16]}…)"
            self.note(f"restore {tool.name}: {verdict}")
            if not result.ok:
                result.error = f"restored image differs from the source: {got}"
            self.results.append(result)
            if not a.keep:
                restored.unlink(missing_ok=True)
        self.note(f"source sha256 (file-edits state): {want}")
        self.single_file(tools, disk)
        # Last: the rollback changes the disk itself (back to the base).
        if not a.no_rollback:
            self.rollback([t for t in tools if isinstance(t, Coffer)], base)
        self.close()
        if not a.keep:
            base.unlink()
            disk.unlink()

    def rollback(self, tools: list[Coffer], base: Path) -> None:
        """Coffer's two ways back to the base: a full restore to a new image, and the disk in
        the file-edits state rolled back in place (only differing chunks fetched); each must
        give the base byte for byte."""
        want = sha256_file(base)
        for tool in tools:
            rp = tool.recovery_points.get("full")
            if rp is None:
                continue
            try:
                result, restored = tool.restore("restore-base-image", rp)
                got = sha256_file(restored) if restored.exists() else "missing"
                result.ok = got == want
                if not result.ok:
                    result.error = f"restored image differs from the base: {got}"
                self.results.append(result)
                if not self.args.keep:
                    restored.unlink(missing_ok=True)
                result = tool.rollback("rollback-file-edits", rp)
                got = sha256_file(tool.source)
                result.ok = got == want
                if not result.ok:
                    result.error = f"the rolled-back disk differs from the base: {got}"
                self.results.append(result)
                verdict = "identical" if result.ok else "DIFFERS"
                self.note(f"rollback {tool.name}: the disk is {verdict} to the base")
            except StepFailed as exc:
                self.fail(tool, ["restore-base-image", "rollback-file-edits"], str(exc))
        self._progress("rollback-file-edits")

    def single_file(self, tools: list[Tool], disk: Path) -> None:
        """One small file of the latest snapshot back (tests.bench.single_file)."""
        small = pick_small_file(disk)
        self.note(
            f"{SINGLE_FILE}: {small.path} ({small.size} bytes) of the latest snapshot "
            "(file-edits state)"
        )
        for tool in tools:
            try:
                self.results.append(tool.get_file(SINGLE_FILE, small))
            except (StepFailed, OSError, RuntimeError) as exc:
                self.fail(tool, [SINGLE_FILE], str(exc))
        self._progress(SINGLE_FILE)

    # -- the memory benchmark ----------------------------------------------------------------

    def sparse_memory(self, tools_wanted: Sequence[str] | None = None) -> None:
        """A full backup and a restore of mostly-empty sparse images of each size, with fresh
        installs: peak memory must not grow with the disk (`tools_wanted` limits the tools)."""
        a = self.args
        self.seed = None
        for size in a.sparse_sizes:
            label = size_label(size)
            where = self.work / f"sparse-{label}"
            where.mkdir()
            image = where / "disk.img"
            data = build_sparse_image(image, size, a.sparse_data, seed=a.seeds[0])
            self.note(f"sparse {label}: {data >> 20} MiB of data in 1 MiB extents")
            step, back = f"full {label} sparse", f"restore {label} sparse"
            made = self.make_tools(where, image)
            if tools_wanted is not None:
                made = [t for t in made if t.name.split("-")[0] in tools_wanted]
            tools = self.start(made, [step, back])
            for tool in tools:
                try:
                    result = tool.backup(step)
                    self.results.append(result)
                    d = result.detail
                    if "rss_agent_before" in d:
                        self.note(
                            f"{step} {tool.name}: agent RSS {d['rss_agent_before'] >> 20} MiB "
                            f"idle before, {d['peak_rss_agent'] >> 20} MiB peak"
                        )
                    restored_result, restored = tool.restore(back)
                    self.results.append(restored_result)
                    restored.unlink(missing_ok=True)
                except StepFailed as exc:
                    self.fail(tool, [step, back], str(exc))
            self.close()
            self._progress(step)
            if not a.keep:
                image.unlink()

    def _progress(self, step: str) -> None:
        # Results of earlier seeds carry their seed (tagged once a seed is done): left out.
        done = [r for r in self.results if r.step == step and "seed" not in r.detail]
        line = ", ".join(f"{r.tool} {r.wall_s:.1f}s" if r.ok else f"{r.tool} FAILED" for r in done)
        print(f"[bench] {step}: {line}", file=sys.stderr, flush=True)

    # -- output ------------------------------------------------------------------------------

    def report(self, title: str) -> None:
        out = console()
        a = self.args
        cache = "warm (never dropped)" if a.no_drop_caches else "dropped before every step"
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        out.print(
            f"machine: {os.cpu_count()} cores, {_mem_gib():.0f} GiB, Linux {platform.release()}; "
            f"workdir {self.work}; page cache {cache}; load average at start {self.load_start}, "
            f"at end {load}"
        )
        for tool, version in sorted(self.versions.items()):
            out.print(f"version {tool}: {version}")
        for tool, setting in self.settings.items():
            out.print(f"settings {tool}: {setting}")
        out.print(notes(self.notes))
        sparse = [r for r in self.results if r.step.endswith(" sparse")]
        churned = [r for r in self.results if r not in sparse]
        for seed in dict.fromkeys(int(r.detail.get("seed", 0)) for r in churned):
            rows = [r for r in churned if int(r.detail.get("seed", 0)) == seed]
            suffix = f", seed {seed}" if seed else ""
            out.print(steps_table([r for r in rows if r.step != SINGLE_FILE], title + suffix))
            single = [r for r in rows if r.step == SINGLE_FILE]
            if single:
                out.print(single_file_table(single))
            out.print(
                issue_table(
                    rows,
                    f"issue 11: Coffer against the faster peer{suffix}",
                    self.write_rates.get(seed),
                )
            )
        if sparse:
            out.print(memory_table(sparse))
        ways_back = rollback_table(self.results)
        if ways_back is not None:
            out.print(ways_back)
        out.print(
            "MB/s = image bytes (10^6) / wall s. CPU s: user+sys of the tool's process "
            "(Coffer: controller + agent + CLI). Peak RSS: max resident "
            "(Coffer: agent/controller). repo/added: allocated bytes of the repository "
            "(Coffer: its datastore)."
        )
        if a.json:
            a.json.write_text(self.to_json())
        if a.keep:
            (self.work / "results.json").write_text(self.to_json())

    def to_json(self) -> str:
        return json.dumps(
            {
                "args": {k: str(v) for k, v in vars(self.args).items()},
                "versions": self.versions,
                "settings": self.settings,
                "notes": self.notes,
                "results": [r.as_dict() for r in self.results],
            },
            indent=2,
        )


def _edits(path: Path, fraction: float, seed: int) -> str:
    s = edit_files(path, fraction, seed)
    parts = ", ".join(f"{k} {s.bytes[k] / (1 << 20):.1f} MiB/{s.files[k]}f" for k in s.bytes)
    return f"{s.total_bytes / (1 << 20):.1f} MiB of file edits: {parts}"


def _mem_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    if not have_root_tools() and not args.sparse_memory:
        print("run as root: building the image needs losetup, mount and mkfs.ext4", file=sys.stderr)
        return 2
    if os.geteuid() != 0 and not args.no_drop_caches:
        print("dropping the page cache needs root (or pass --no-drop-caches)", file=sys.stderr)
        return 2
    missing = [t for t in ("restic", "borg") if t in args.tools and not shutil.which(t)]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="coffer-bench-", dir=args.workdir))
    bench = Bench(args, work)
    try:
        if args.sparse_memory:
            bench.sparse_memory()
            bench.report("Peak memory on sparse images (full backup)")
        else:
            bench.churn()
            if not args.no_memory:
                bench.sparse_memory(tools_wanted=["coffer"])
            bench.report(
                f"{' vs '.join(args.tools)}: {size_label(args.size)} image, "
                f"churn {args.fraction:.0%} of it per incremental"
            )
    finally:
        bench.close()
        for image in work.glob("**/*.img"):
            if loop_devices_for(image):
                print(f"warning: a loop device is left on {image}", file=sys.stderr)
        if args.keep:
            print(f"kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.ok for r in bench.results) else 1


if __name__ == "__main__":
    sys.exit(main())
