"""The benchmark's one table: steps x tools, and Coffer's ratio to the best peer of each step."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.table import Table

from tests.bench.measure import StepResult

MiB = 1 << 20


def console() -> Console:
    # Piped output has no terminal width: do not wrap the table at 80 columns.
    c = Console(highlight=False)
    if not c.is_terminal:
        c = Console(highlight=False, width=200, file=sys.stdout)
    return c


def is_coffer(result: StepResult) -> bool:
    return result.tool.startswith("coffer")


def _mib(n: int) -> str:
    return f"{n / MiB:,.1f}"


def _rss(result: StepResult) -> str:
    if is_coffer(result) and "peak_rss_agent" in result.detail:
        agent = result.detail["peak_rss_agent"] / MiB
        controller = result.detail["peak_rss_controller"] / MiB
        return f"{agent:.0f}/{controller:.0f}"
    return f"{result.peak_rss / MiB:.0f}"


def _ratio(value: float, best: float | None) -> str:
    if best is None or best <= 0:
        return "—"
    return f"{value / best:.2f}x"


def steps_table(results: Sequence[StepResult], title: str) -> Table:
    """Rows: step x tool; Coffer rows carry wall and bytes-added ratios to the best peer."""
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("step", "left"),
        ("tool", "left"),
        ("wall s", "right"),
        ("MB/s", "right"),
        ("CPU s", "right"),
        ("peak RSS MiB", "right"),
        ("repo MiB", "right"),
        ("added MiB", "right"),
        ("wall ÷ fastest peer", "right"),
        ("added ÷ smallest peer", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    steps = list(dict.fromkeys(r.step for r in results))
    for i, step in enumerate(steps):
        rows = [r for r in results if r.step == step]
        peers = [r for r in rows if r.ok and not is_coffer(r)]
        fastest = min((r.wall_s for r in peers), default=None)
        smallest = min((r.added_bytes for r in peers), default=None)
        is_restore = step.startswith(("restore", "rollback"))
        for r in rows:
            if not r.ok and r.wall_s == 0:
                first = (r.error.splitlines() or ["failed"])[0][:120]
                table.add_row(step, r.tool, f"[red]FAILED: {first}[/red]")
                continue
            wall_ratio = _ratio(r.wall_s, fastest) if is_coffer(r) else ""
            added_ratio = ""
            if is_coffer(r) and not is_restore:
                added_ratio = _ratio(r.added_bytes, smallest)
            tool = r.tool if r.ok else f"[red]{r.tool} (FAILED)[/red]"
            table.add_row(
                step,
                tool,
                f"{r.wall_s:.1f}",
                f"{r.mb_per_s:.0f}",
                f"{r.cpu_s:.1f}",
                _rss(r),
                _mib(r.repo_bytes),
                "—" if is_restore else _mib(r.added_bytes),
                wall_ratio,
                added_ratio,
            )
        if i < len(steps) - 1:
            table.add_section()
    return table


ROLLBACK_STEPS = ("restore-base-image", "rollback-file-edits")


def rollback_table(results: Sequence[StepResult]) -> Table | None:
    """Coffer's full restore of the base and its in-place rollback of the file edits, side by
    side: time and bytes compared, fetched and written (None when neither ran)."""
    rows = [r for r in results if r.step in ROLLBACK_STEPS and r.ok and is_coffer(r)]
    if not rows:
        return None
    table = Table(
        title="Coffer: back to the full backup's recovery point, as a new image and in place",
        title_justify="left",
    )
    for name in ("step", "tool", "wall s", "compared MiB", "fetched MiB", "written MiB"):
        table.add_column(name, justify="left" if name in ("step", "tool") else "right")
    table.add_column("wall ÷ full restore", justify="right")
    full = {r.tool: r.wall_s for r in rows if r.step == ROLLBACK_STEPS[0]}
    for r in rows:
        restore = (r.detail.get("job") or {}).get("restore") or {}
        table.add_row(
            r.step,
            r.tool,
            f"{r.wall_s:.1f}",
            _mib(int(restore.get("bytes_compared", 0))),
            _mib(int(restore.get("bytes_fetched", 0))),
            _mib(int(restore.get("bytes_written", 0))),
            _ratio(r.wall_s, full.get(r.tool)),
        )
    return table


def single_file_table(results: Sequence[StepResult]) -> Table:
    """One small file back: seconds to it and bytes read from the repository, per tool."""
    table = Table(
        title="one small file of the latest snapshot back (tests.bench.single_file)",
        title_justify="left",
    )
    for name in (
        "tool",
        "file written s",
        "all done s",
        "read from repository MiB",
        "% of image",
        "Coffer: fetched (stored / raw MiB, chunks)",
    ):
        table.add_column(name, justify="left" if name == "tool" else "right")
    for r in results:
        if not r.ok and r.wall_s == 0:
            first = (r.error.splitlines() or ["failed"])[0][:120]
            table.add_row(r.tool, f"[red]FAILED: {first}[/red]")
            continue
        d = r.detail
        read = int(d.get("read_from_repository", 0))
        own = "—"
        if is_coffer(r):
            own = (
                f"{d['coffer_bytes_fetched'] / MiB:.2f} / {d['coffer_raw_bytes_fetched'] / MiB:.1f}"
                f", {d['coffer_chunks_fetched']}"
            )
        table.add_row(
            r.tool if r.ok else f"[red]{r.tool} (FAILED: {r.error[:80]})[/red]",
            f"{r.wall_s:.2f}",
            f"{float(d.get('total_s', 0.0)):.2f}",
            f"{read / MiB:.2f}",
            f"{100 * read / r.image_bytes:.2f}%" if r.image_bytes else "—",
            own,
        )
    return table


def notes(lines: Iterable[str]) -> str:
    """Indented lines (a multi-line note's continuation lines indented further)."""
    return "\n".join("  " + "\n    ".join(line.splitlines() or [""]) for line in lines)
