"""Who asked for a job: the operator whose call started it, "schedule" for the scheduler, and
for a job that follows another (a prune after a backup) whoever asked for that one.

The in-process controller of `tests.test_protection` on a manual clock; the operator's name
is set as the gRPC edge sets it for a call (`controller.audit.requested`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.audit import SCHEDULE, requested
from controller.catalog import JobFilter
from shared.clock import ManualClock
from shared.model import Operation
from tests.test_protection import (
    EU,
    MONDAY_NOON,
    SHOP_WEB,
    Controller,
    back_up,
    controller,
    settle,
    ts,
    until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Controller]:
    async with controller(tmp_path, ManualClock(MONDAY_NOON)) as env:
        await env.create_vault(EU, "eu-west")
        await env.enrol_all()
        yield env


async def test_a_backup_and_the_prune_after_it_are_the_operators(env: Controller) -> None:
    with requested("alice"):
        await env.protected(EU, SHOP_WEB)
        backup = await back_up(env, SHOP_WEB)
    assert backup.requested_by == "alice"

    async def pruned() -> bool:
        return bool(await env.catalog.jobs(JobFilter(operations=[Operation.PRUNE])))

    await until(pruned, "the prune after the backup")
    [prune] = await env.catalog.jobs(JobFilter(operations=[Operation.PRUNE]))
    assert prune.requested_by == "alice"
    # As recorded, not only as held in memory.
    assert (await env.catalog.job(backup.id)).requested_by == "alice"


async def test_a_scheduled_backup_is_the_schedules(env: Controller, tmp_path: Path) -> None:
    with requested("alice"):
        await env.protected(EU, SHOP_WEB)
    env.clock.set(ts(2025, 3, 4, 2))
    env.protection.scheduler.changed()

    async def scheduled() -> bool:
        return bool(await env.backups())

    await until(scheduled, "the scheduled backup")
    await settle()
    [job] = await env.backups()
    assert job.requested_by == SCHEDULE
