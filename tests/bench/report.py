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


# -- the table of issue 11: Coffer against the faster peer, with the issue's targets ----------

INCREMENTALS = ("incr-scatter", "incr-clustered", "incr-file-edits")
TRACKING_STEP = "incr-tracking"
"""The changed-block tracking incremental (branch i11-cbt): its row is empty until that step
runs here; its target is 10x borg's file-edit incremental."""
AGENT_RSS_LIMIT, CONTROLLER_RSS_LIMIT = 100 * MiB, 150 * MiB


def _speedup(coffer: StepResult | None, peer: StepResult | None) -> float | None:
    if coffer is None or peer is None or coffer.wall_s <= 0:
        return None
    return peer.wall_s / coffer.wall_s


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return "—"
    return "[green]met[/green]" if ok else "[red]not met[/red]"


def _rss_pair(rows: Sequence[StepResult]) -> tuple[int, int]:
    agent = max((int(r.detail.get("peak_rss_agent", 0)) for r in rows), default=0)
    controller = max((int(r.detail.get("peak_rss_controller", 0)) for r in rows), default=0)
    return agent, controller


def issue_table(results: Sequence[StepResult], title: str, write_rate: float | None) -> Table:
    """Issue 11's table for one image: each step's Coffer, restic and borg figures, Coffer's
    speed-up over the faster peer (peer wall / Coffer wall), the issue's target and whether
    this run meets it. `write_rate` (bytes/s) is the machine's sequential write rate measured
    in the same run: the restore's second bound."""
    table = Table(title=title, title_justify="left")
    for name in ("step", "coffer", "restic", "borg", "speed-up ÷ faster peer", "target", ""):
        table.add_column(name, justify="left" if name in ("step", "target") else "right")

    def get(step: str, tool: str) -> StepResult | None:
        for r in results:
            if r.step == step and r.ok and (is_coffer(r) if tool == "coffer" else r.tool == tool):
                return r
        return None

    def cell(r: StepResult | None, added: bool) -> str:
        if r is None:
            return "—"
        text = f"{r.wall_s:.2f} s, {r.cpu_s:.1f} CPU s"
        return f"{text}, +{r.added_bytes / MiB:.0f} MiB" if added else text

    def faster(step: str) -> StepResult | None:
        peers = [p for p in (get(step, "restic"), get(step, "borg")) if p is not None]
        return min(peers, key=lambda p: p.wall_s, default=None)

    c, borg, peer = get("full", "coffer"), get("full", "borg"), faster("full")
    up = _speedup(c, peer)
    ok = None if up is None or c is None or borg is None else up >= 2.0 and c.cpu_s <= borg.cpu_s
    table.add_row(
        "full",
        cell(c, True),
        cell(get("full", "restic"), True),
        cell(borg, True),
        _x(up),
        "≥ 2.0x, CPU s ≤ borg's",
        _verdict(ok),
    )
    for step in INCREMENTALS:
        c, restic, borg = get(step, "coffer"), get(step, "restic"), get(step, "borg")
        vs_borg = _speedup(c, borg)
        peers_added = [p.added_bytes for p in (restic, borg) if p is not None]
        ok = None
        if c is not None and vs_borg is not None and peers_added:
            ok = vs_borg >= 1.5 and c.added_bytes <= min(peers_added)
        table.add_row(
            step,
            cell(c, True),
            cell(restic, True),
            cell(borg, True),
            f"{_x(_speedup(c, faster(step)))} ({_x(vs_borg)} borg)",
            "≥ 1.5x borg, added ≤ smaller peer's",
            _verdict(ok),
        )
    # Both from the tracking run (tests.bench.tracking): the same edits on the same image.
    c, borg = get(TRACKING_STEP, "coffer"), get(TRACKING_STEP, "borg")
    vs_borg = _speedup(c, borg)
    table.add_row(
        f"{TRACKING_STEP} (changed-block tracking, file edits)",
        cell(c, True) if c is not None else "[dim]not run (--no-tracking)[/dim]",
        "—",
        cell(borg, True) + " (file edits)" if borg is not None else "—",
        f"{_x(vs_borg)} borg",
        "≥ 10x borg's file-edit incremental",
        _verdict(None if vs_borg is None else vs_borg >= 10.0),
    )
    c, peer = get("restore", "coffer"), faster("restore")
    up = _speedup(c, peer)
    of_rate = None
    if c is not None and write_rate and c.wall_s > 0:
        of_rate = c.image_bytes / c.wall_s / write_rate
    bound = ""
    if up is not None and up >= 1.5:
        bound = " (bound: 1.5x peer)"
    elif of_rate is not None and of_rate >= 0.9:
        bound = " (bound: write rate)"
    rate_text = "—"
    if of_rate is not None and write_rate:
        rate_text = f"{of_rate:.0%} of {write_rate / 1e6:.0f} MB/s"
    table.add_row(
        "restore",
        cell(c, False),
        cell(get("restore", "restic"), False),
        cell(get("restore", "borg"), False),
        f"{_x(up)}; {rate_text}",
        "≥ 1.5x, or ≥ 90% of the sequential write rate" + bound,
        _verdict(None if up is None else up >= 1.5 or (of_rate or 0.0) >= 0.9),
    )

    def restoring(r: StepResult) -> bool:
        return r.step.startswith(("restore", "rollback"))

    for label, restores in (("peak RSS, backups", False), ("peak RSS, restore", True)):
        rows = [r for r in results if r.ok and restoring(r) == restores]
        agent, controller = _rss_pair([r for r in rows if is_coffer(r)])
        peers = []
        for name in ("restic", "borg"):
            peak = max((r.peak_rss for r in rows if r.tool == name), default=0)
            peers.append(f"{peak / MiB:.0f} MiB" if peak else "—")
        table.add_row(
            f"{label} (agent / controller)",
            f"{agent / MiB:.0f} / {controller / MiB:.0f} MiB",
            *peers,
            "",
            "agent ≤ 100, controller ≤ 150 MiB",
            _verdict(
                None
                if not agent
                else agent <= AGENT_RSS_LIMIT and controller <= CONTROLLER_RSS_LIMIT
            ),
        )
    return table


def memory_table(results: Sequence[StepResult]) -> Table:
    """Coffer's peak RSS in a full backup and a restore of sparse images of several sizes."""
    table = Table(
        title="peak memory on sparse images (fresh install per size)", title_justify="left"
    )
    for name in ("step", "tool", "wall s", "agent MiB", "controller MiB", "target", ""):
        table.add_column(name, justify="left" if name in ("step", "tool", "target") else "right")
    for r in results:
        if not r.ok:
            table.add_row(r.step, r.tool, f"[red]FAILED: {r.error[:100]}[/red]")
            continue
        agent = int(r.detail.get("peak_rss_agent", r.peak_rss))
        controller = int(r.detail.get("peak_rss_controller", 0))
        table.add_row(
            r.step,
            r.tool,
            f"{r.wall_s:.1f}",
            f"{agent / MiB:.0f}",
            f"{controller / MiB:.0f}" if is_coffer(r) else "—",
            "agent ≤ 100, controller ≤ 150 MiB" if is_coffer(r) else "",
            _verdict(agent <= AGENT_RSS_LIMIT and controller <= CONTROLLER_RSS_LIMIT)
            if is_coffer(r)
            else "",
        )
    return table
