"""Where a backup's time goes: py-spy samples of the agent and the controller during a full
backup (and a restore) of the benchmark image.

    python -m tests.bench.profile [--size 2G] [--seed 1] [--workdir /var/tmp] [--rate 200]
                                  [--steps full,restore]

Run as root with `py-spy` installed (`pip install py-spy`). Builds the image (`tests.bench.image`),
starts a private Coffer (`tests.bench.coffer`), and for each step (`full`, `restore`, and
`incr-clustered` or `incr-scatter`: the image churned in place as `tests.bench.run` churns
its copies, then backed up again) attaches `py-spy record --format raw` to both
processes for the step, and prints per process the share of samples by leaf function (the
frame on top of each stack) and by a few named stages that match anywhere in a stack. The
page cache is dropped before each step, as in `tests.bench.run`.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.bench.coffer import Coffer
from tests.bench.image import build_image, churn_clustered, churn_scatter
from tests.bench.measure import drop_caches, parse_size

# Stages named by a frame anywhere in a sample's stack (function name, file), first match wins;
# the file is matched as a substring, "" matches any.
STAGES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("syncfs / waiting for a datastore sync", (("_syncfs", ""), ("wait", "datastore/local.py"))),
    ("disk read (O_DIRECT)", (("_read_direct", ""), ("read_into", "agent/disk.py"))),
    ("restore write", (("store", "agent/restore.py"),)),
    ("decompress (zstd)", (("decompress", "shared/blob.py"),)),
    ("compress (zstd)", (("compress", "shared/blob.py"), ("pack", "shared/blob.py"))),
    ("hash (BLAKE3)", (("digest", "shared/digest.py"), ("chunk_digest", ""))),
    ("datastore write", (("put", "datastore/local.py"),)),
    ("datastore read", (("get", "datastore/local.py"),)),
    ("gRPC / protobuf", (("", "grpc"), ("", "_pb2"))),
    ("asyncio loop / idle pool threads", (("", "asyncio/"), ("", "selectors.py"),
                                          ("_worker", "concurrent/futures"))),
)  # fmt: skip


def _frame(text: str) -> tuple[str, str]:
    """(function, file) of a py-spy frame "function (file:line)"."""
    function, _, rest = text.partition(" (")
    return function.rsplit(".", 1)[-1], rest.rsplit(":", 1)[0]


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.profile", description=__doc__)
    p.add_argument("--size", type=parse_size, default=parse_size("2G"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--chunk-size", type=parse_size, default=parse_size("512K"))
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--rate", type=int, default=200, help="samples per second (200)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", type=Path, help="keep py-spy's raw samples here")
    p.add_argument(
        "--steps",
        default="full,restore",
        help="comma-separated, in order: full, incr-clustered, incr-scatter, restore",
    )
    return p.parse_args(argv)


def summarize(raw: Path, label: str, top: int = 12) -> str:
    """Share of samples by stage and by leaf function of a py-spy raw (collapsed) file."""
    leaves: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        leaves["{} ({})".format(*frames[-1])] += count
        for name, needles in STAGES:
            if any(
                (not fn or fn == function) and where in file
                for function, file in frames
                for fn, where in needles
            ):
                stages[name] += count
                break
        else:
            stages["other"] += count
    lines = [f"{label}: {total} samples (busy threads)"]
    for name, count in stages.most_common():
        lines.append(f"  stage {count / max(total, 1):6.1%}  {name}")
    for name, count in leaves.most_common(top):
        lines.append(f"  leaf  {count / max(total, 1):6.1%}  {name}")
    return "\n".join(lines)


def profiled(coffer: Coffer, step: str, run: str, rate: int, out: Path) -> str:
    assert coffer.controller is not None
    assert coffer.agent is not None
    spies = []
    for name, pid in (("agent", coffer.agent.pid), ("controller", coffer.controller.pid)):
        raw = out / f"{step}-{name}.txt"
        spies.append(
            (
                name,
                raw,
                subprocess.Popen(
                    ["py-spy", "record", "-p", str(pid), "-r", str(rate), "--format", "raw",
                     "-o", str(raw), "--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
        )  # fmt: skip
    try:
        if run == "backup":
            result = coffer.backup(step)
        else:
            result, restored = coffer.restore(step)
            restored.unlink(missing_ok=True)
    finally:
        for _, _, spy in spies:
            spy.send_signal(signal.SIGINT)
        for _, _, spy in spies:
            spy.wait(timeout=60)
    lines = [
        f"== {step}: wall {result.wall_s:.2f} s, CPU {result.cpu_s:.1f} s "
        f"(agent {result.detail['cpu_s_agent']:.1f}, controller "
        f"{result.detail['cpu_s_controller']:.1f})"
    ]
    lines += [summarize(raw, name) for name, raw, _ in spies]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    if shutil.which("py-spy") is None:
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="coffer-profile-", dir=args.workdir))
    try:
        image = work / "disk.img"
        build_image(image, args.size, seed=args.seed)
        coffer = Coffer(work / "coffer", image, chunk_size=args.chunk_size, before_step=drop_caches)
        try:
            coffer.setup()
            out = args.out or work
            out.mkdir(parents=True, exist_ok=True)
            for step in args.steps.split(","):
                if step == "incr-clustered":
                    churn_clustered(image)
                elif step == "incr-scatter":
                    churn_scatter(image)
                elif step not in ("full", "restore"):
                    raise SystemExit(f"unknown step {step!r}")
                run = "restore" if step == "restore" else "backup"
                print(profiled(coffer, step, run, args.rate, out), flush=True)
        finally:
            coffer.close()
    finally:
        if args.keep:
            print(f"kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
