"""`coffer files ls|get|mount|unmount`: single files and trees of a recovery point.

Each command is a `FileRecovery` job. The recovery point's disk is opened read-only by the
agent of the target VM (the source VM unless `--target-vm` names another VM of the vault's
region), inside that VM: only the chunks the file system touches are fetched, and nothing is
mounted on the controller. On a partitioned disk a path starts with its partition
(`/p2/etc/hosts`) and `ls /` lists the partitions.

File names come from a file system a VM wrote: they are shown with bytes that are not UTF-8
and characters that are not printable escaped (`shared.printable`); `--json` gives each name
escaped the same way and, for programs, its exact bytes in base64. Paths given on the command
line are passed as the bytes the shell gave (`$'caf\\xe9'` names a Latin-1 file).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import stat
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from controller.cli import exits
from controller.cli.client import Connection, call
from controller.cli.jobs import finish, follow, show_job
from controller.cli.output import (
    as_dict,
    console,
    errors,
    iso,
    json_option,
    print_json,
    safe,
    size,
    span,
    table,
)
from shared.model import JobStatus
from shared.printable import shown
from shared.rpc import common_pb2, operator_pb2

_TYPE_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "block": stat.S_IFBLK,
    "char": stat.S_IFCHR,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
}
_TTL = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?")
MAX_TTL_SECONDS = 7 * 24 * 3600


def parse_ttl(text: str) -> float:
    """'1h', '30m', '2h30m', '90s', '90', '7d' as seconds; BadParameter otherwise."""
    match = _TTL.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise click.BadParameter(f"{text!r} is not a duration such as 30m, 1h, 2h30m or 90s")
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = days * 86400 + hours * 3600 + minutes * 60 + seconds
    if not 1 <= total <= MAX_TTL_SECONDS:
        raise click.BadParameter(f"{text!r}: a mount lasts 1 s to 7 days")
    return total


def source_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """VM_ID, --rp, --disk, --target-vm, --from-copy: which disk of which recovery point, read
    from where, opened where."""
    f = click.option(
        "--from-copy",
        is_flag=True,
        help="Read the vault's off-site copy instead of its datastore.",
    )(f)
    f = click.option(
        "--target-vm",
        default="",
        help="Open it in this VM's agent instead (a VM of the vault's region).",
    )(f)
    f = click.option("--disk", required=True, help="Disk of the recovery point.")(f)
    f = click.option("--rp", "rp_id", required=True, help="Recovery point (`coffer rp list VM`).")(
        f
    )
    return click.argument("vm_id", metavar="VM")(f)


def _source(
    vm_id: str, rp_id: str, disk: str, target_vm: str, from_copy: bool
) -> operator_pb2.FileRecoverySource:
    return operator_pb2.FileRecoverySource(
        vm_id=vm_id,
        recovery_point_id=rp_id,
        disk=disk,
        target_vm_id=target_vm,
        from_copy=from_copy,
    )


def _failed(job: operator_pb2.Job) -> bool:
    return JobStatus(job.status) in (JobStatus.FAILED, JobStatus.CANCELLED)


def _exit_failed(job: operator_pb2.Job) -> None:
    """Say why the job failed, as a refused call reads, and exit with its code."""
    errors.print(
        f"[bold red]error[/bold red] ({safe(job.error_code)}): {safe(job.error_message)} "
        f"(job {safe(job.id)})",
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(exits.of_jobs([job]))


def _details(job: operator_pb2.Job) -> dict[str, Any]:
    details: dict[str, Any] = json.loads(job.details_json or "{}")
    return details


@click.group()
def files() -> None:
    """Single files of a recovery point: list, copy out, mount.

    The recovery point's disk is opened read-only inside the VM (or --target-vm), fetching
    only what is read. On a partitioned disk paths start with the partition (/p2/etc), and
    `ls VM --rp RP --disk D /` lists the partitions.
    """


# --- ls -------------------------------------------------------------------------------------


def _mode(entry: common_pb2.FileEntry) -> str:
    return stat.filemode(_TYPE_BITS.get(entry.type, 0) | entry.mode)


def _modified(entry: common_pb2.FileEntry) -> str:
    return iso(datetime.fromtimestamp(entry.mtime_ns / 1e9, UTC))


def _entry_json(entry: common_pb2.FileEntry) -> dict[str, Any]:
    if entry.type == "partition":
        return {
            "name": shown(entry.name),
            "type": entry.type,
            "size_bytes": entry.size_bytes,
            "fs_type": entry.fs_type or None,
            "note": shown(entry.note) if entry.note else None,
        }
    return {
        "name": shown(entry.name),
        "name_base64": base64.b64encode(entry.name).decode(),
        "type": entry.type,
        "size_bytes": entry.size_bytes,
        "mtime": iso(datetime.fromtimestamp(entry.mtime_ns / 1e9, UTC), precise=True),
        "mtime_ns": entry.mtime_ns,
        "mode": entry.mode,
        "mode_text": _mode(entry),
        "uid": entry.uid,
        "gid": entry.gid,
        "nlink": entry.nlink,
        "link_target": shown(entry.link_target) if entry.type == "symlink" else None,
    }


@files.command(name="ls")
@source_options
@click.argument("path", default="/")
@click.option(
    "--limit", default=1000, show_default=True, type=click.IntRange(1, 10000),
    help="Entries to show; a longer listing ends with how to see the next ones.",
)  # fmt: skip
@click.option("--after", default=None, help="Start after this name (from the last listing).")
@json_option
@click.pass_obj
def files_ls(
    connection: Connection,
    vm_id: str,
    rp_id: str,
    disk: str,
    target_vm: str,
    from_copy: bool,
    path: str,
    limit: int,
    after: str | None,
    as_json: bool,
) -> None:
    """List a directory of a recovery point's file system.

    Name, type, size, modification time, mode and owner of each entry, sorted by name.
    """
    request = operator_pb2.ListFilesRequest(
        source=_source(vm_id, rp_id, disk, target_vm, from_copy),
        path=os.fsencode(path),
        limit=limit,
        after=os.fsencode(after) if after else b"",
    )
    reply = call(connection, lambda s: s.ListFiles(request))
    job = reply.job
    more = bytes(reply.next_after)
    if as_json:
        print_json(
            {
                "job": as_dict(job),
                "path": shown(reply.path or os.fsencode(path)),
                "entries": [_entry_json(e) for e in reply.entries],
                "next_after": shown(more) if more else None,
                "next_after_base64": base64.b64encode(more).decode() if more else None,
            }
        )
        if _failed(job):
            sys.exit(exits.of_jobs([job]))
        return
    if _failed(job):
        _exit_failed(job)
    title = f"{shown(reply.path)} of recovery point {rp_id}, disk {disk} of {vm_id}"
    if reply.entries and all(e.type == "partition" for e in reply.entries):
        table(
            f"Partitions of recovery point {rp_id}, disk {disk} of {vm_id}",
            ("Partition", "File system", "Size", "Note"),
            [
                [shown(e.name), e.fs_type or "-", size(e.size_bytes), shown(e.note) or "-"]
                for e in reply.entries
            ],
        )
    else:
        table(
            title,
            ("Name", "Type", "Size", "Modified", "Mode", "Owner"),
            [
                [
                    shown(e.name) + (f" -> {shown(e.link_target)}" if e.type == "symlink" else ""),
                    e.type,
                    size(e.size_bytes) if e.type == "file" else "-",
                    _modified(e),
                    _mode(e),
                    f"{e.uid}:{e.gid}",
                ]
                for e in reply.entries
            ],
        )
    if more:
        name = shown(more)
        again = f"--after {shlex.quote(name)}" if name == os.fsdecode(more) else "--after NAME"
        console.print(
            f"More entries follow: list them with {safe(again)} (job {job.id}).",
            highlight=False,
            soft_wrap=True,
        )


# --- get ------------------------------------------------------------------------------------


def _plural(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def copy_summary(job: operator_pb2.Job) -> list[str]:
    """What a finished get copied, in words."""
    details = _details(job)
    copied = details.get("copied", {})
    kinds = [_plural(int(copied.get("files", 0)), "file")]
    for key, one, many in (
        ("directories", "directory", "directories"),
        ("symlinks", "symbolic link", None),
        ("hard_links", "hard link", None),
    ):
        if copied.get(key):
            kinds.append(_plural(int(copied[key]), one, many))
    listed = ", ".join(kinds[:-1]) + " and " + kinds[-1] if len(kinds) > 1 else kinds[0]
    lines = [
        f"Copied {listed} ({size(int(copied.get('bytes_written', 0)))}) into "
        f"{details.get('destination')} on {job.item or job.vm_id}."
    ]
    skipped = int(copied.get("skipped", 0))
    if skipped:
        listed = ", ".join(details.get("skipped_files", []))
        lines.append(
            f"Skipped {_plural(skipped, 'special file')} (devices, FIFOs, sockets are not "
            f"created): {listed}"
        )
    else:
        lines.append("Skipped: nothing.")
    lines.append(_fetched(job))
    return lines


def _fetched(job: operator_pb2.Job) -> str:
    details = _details(job)
    return (
        f"Fetched {size(int(details.get('bytes_fetched', job.bytes_read)))} from the datastore "
        f"({_plural(int(details.get('chunks_fetched', 0)), 'chunk')}, "
        f"{size(int(details.get('raw_bytes_fetched', 0)))} uncompressed) in "
        f"{_took(job)}."
    )


def _took(job: operator_pb2.Job) -> str:
    if not job.HasField("ended_at"):
        return "-"
    seconds = max(job.ended_at.ToNanoseconds() / 1e9 - job.started_at.ToNanoseconds() / 1e9, 0)
    return f"{seconds:.2f} s" if seconds < 10 else span(seconds)


@files.command(name="get")
@source_options
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--to", "destination", required=True,
    help="Directory on the target VM to copy into (made if missing); it must lie under one of "
    "that agent's restore_dirs.",
)  # fmt: skip
@click.option("--no-wait", is_flag=True, help="Start the job and return at once.")
@json_option
@click.pass_obj
def files_get(
    connection: Connection,
    vm_id: str,
    rp_id: str,
    disk: str,
    target_vm: str,
    from_copy: bool,
    paths: tuple[str, ...],
    destination: str,
    no_wait: bool,
    as_json: bool,
) -> None:
    """Copy files or whole trees out of a recovery point.

    Each PATH is copied under its own name into the directory --to, on the VM (or
    --target-vm), keeping modes, owners, times, symbolic links, hard links and holes. An
    existing name there is refused, and a copy that fails leaves nothing.
    """
    request = operator_pb2.GetFilesRequest(
        source=_source(vm_id, rp_id, disk, target_vm, from_copy),
        paths=[os.fsencode(p) for p in paths],
        destination=destination,
    )
    job = call(connection, lambda s: s.GetFiles(request))
    if not as_json:
        console.print(
            f"Started file recovery job [bold]{job.id}[/bold]", highlight=False, soft_wrap=True
        )
    if no_wait:
        finish(job, as_json)
        return
    job = follow(connection, job.id, as_json)
    if as_json or _failed(job):
        finish(job, as_json)
        return
    for line in copy_summary(job):
        console.print(safe(line), highlight=False, soft_wrap=True)


# --- mount, unmount -------------------------------------------------------------------------


def mount_lines(job: operator_pb2.Job) -> list[str]:
    """Where a mount job's file systems are, and how it ends, in words."""
    details = _details(job)
    expires = details.get("expires_at")
    until = iso(datetime.fromtimestamp(float(expires), UTC)) if expires else "its TTL"
    lines = [
        f"Mounted recovery point {job.recovery_point_id}, disk {details.get('disk')} of "
        f"{details.get('source_vm')}, read-only in VM {job.item or job.vm_id} until {until} "
        f"(job {job.id}):"
    ]
    mounts: dict[str, str] = details.get("mounts", {})
    width = max((len(name) for name in mounts), default=0)
    lines += [f"  {name.ljust(width)}  {where}" for name, where in mounts.items()]
    for name, why in details.get("skipped_partitions", {}).items():
        lines.append(f"  {name.ljust(width)}  not mounted: {why}")
    lines.append(
        f"Browse them inside that VM as root. It ends by itself at its TTL, or now with: "
        f"coffer files unmount {job.id}"
    )
    return lines


@files.command(name="mount")
@source_options
@click.option(
    "--ttl", default="1h", show_default=True,
    help="Unmount after this long: 90s, 30m, 2h30m, 1d (at most 7d).",
)  # fmt: skip
@json_option
@click.pass_obj
def files_mount(
    connection: Connection,
    vm_id: str,
    rp_id: str,
    disk: str,
    target_vm: str,
    from_copy: bool,
    ttl: str,
    as_json: bool,
) -> None:
    """Mount a recovery point's disk read-only inside a VM, to browse.

    Prints where each file system is mounted inside the VM (or --target-vm). The mount is a
    job that stays InProgress while mounted; it ends at its TTL or with `coffer files
    unmount JOB`.
    """
    request = operator_pb2.MountFilesRequest(
        source=_source(vm_id, rp_id, disk, target_vm, from_copy), ttl_seconds=parse_ttl(ttl)
    )
    job = call(connection, lambda s: s.MountFiles(request))
    if as_json or _failed(job):
        finish(job, as_json)
        return
    for line in mount_lines(job):
        console.print(safe(line), highlight=False, soft_wrap=True)


@files.command(name="unmount")
@click.argument("job_id", metavar="JOB")
@json_option
@click.pass_obj
def files_unmount(connection: Connection, job_id: str, as_json: bool) -> None:
    """End a mount of `coffer files mount` now.

    JOB is the mount's job id (or a unique prefix of 4 or more characters).
    """
    job = call(connection, lambda s: s.UnmountFiles(operator_pb2.GetJobRequest(id=job_id)))
    if as_json or _failed(job):
        finish(job, as_json)
        return
    show_job(job)
