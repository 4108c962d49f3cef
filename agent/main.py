"""`coffer-agent`: the in-guest backup extension; runs until SIGINT or SIGTERM.

`coffer-agent doctor --config FILE` checks what a backup needs on this VM instead, and
`coffer-agent enrol --controller ADDR --token TOKEN --config FILE` gets this VM's certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

from agent import doctor, enrolment
from agent.config import AgentConfig
from agent.session import Agent
from shared.daemon import run_daemon
from shared.errors import InvalidArgument
from shared.keyfiles import recover_pair
from shared.tls import Identity, identity_of_certificate


def check_identity(config: AgentConfig) -> None:
    """Refuse to start with TLS files that cannot work: better now than at every reconnect."""
    # A renewal a crash interrupted is finished (or undone) first.
    if config.tls.cert.parent.exists():
        recover_pair(config.tls.cert, config.tls.key)
    identity = identity_of_certificate(config.tls.read().cert)
    if identity != Identity("agent", config.vm_id):
        raise InvalidArgument(
            detail=f"{config.tls.cert} is the certificate of {identity}, but this agent is "
            f"VM {config.vm_id!r}: enrol it (`coffer enrol create --vm {config.vm_id}`, then "
            "`coffer-agent enrol`) or issue one with "
            f"`coffer pki issue-agent {config.vm_id}`"
        )


async def serve(config: AgentConfig) -> None:
    check_identity(config)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await Agent(config).run()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["doctor"]:
        return doctor.main(args[1:])
    if args[:1] == ["enrol"]:
        return enrolment.main(args[1:])
    return run_daemon("coffer-agent", __doc__, AgentConfig.load, serve, args)


if __name__ == "__main__":
    sys.exit(main())
