"""One worker process of the fleet simulator: many simulated agents on one asyncio loop.

    python -m tests.bench.fleet.agents --target 127.0.0.1:PORT --certs DIR --first 0 --count 2500

Each simulated agent is what the controller sees of a real one: its own mutual-TLS gRPC
channel with its own certificate, a valid hello, the agent's channel options (keepalive
included, `shared.rpc_channel.channel_options`), heartbeats at the interval the controller
asks for, and one result per command (`commands.answer`, the hook). It dials again as the
real agent does (`agent.session.RECONNECT`, full jitter; a retry-after honoured through
`shared.backoff.after_refusal`).

Driven over stdin, one word a line: `connect [SECONDS]` (every agent dials, at once or each
at a random moment within SECONDS), `drop N [SECONDS]` (the worker's first N agents hang up and
dial again, each within SECONDS), `disconnect` (every agent hangs up), `stop`. End of stdin
stops it too, so it never outlives the benchmark; and it stops by itself after
`--max-seconds`. Every quarter second it prints one JSON line of counters to stdout: agents in
session now, dial attempts, refusals with a retry-after, sessions begun, commands answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from agent.session import HEALTHY_SESSION, RECONNECT, say_hello
from shared.backoff import after_refusal
from shared.errors import ControllerBusy
from shared.rpc import agent_pb2, agent_pb2_grpc
from shared.rpc_channel import channel_options
from shared.rpc_errors import from_rpc_error
from shared.version import coffer_version
from tests.bench.fleet.commands import CommandHook, answer

REPORT_SECONDS = 0.25
DISK_BYTES = 10 << 30
SAMPLES_PER_KIND = 3


def vm_name(n: int) -> str:
    return f"fleet-{n:05d}"


@dataclass
class Counters:
    in_session: int = 0
    attempts: int = 0
    refused: int = 0
    sessions: int = 0
    commands: int = 0
    errors: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    """Attempts that ended without a session, by how: the gRPC status code and the start of its
    details (a refused port, a handshake cut short, a refusal with a retry-after...)."""

    samples: dict[str, list[str]] = field(default_factory=dict)
    """The first few failures of each kind as gRPC core tells them (its debug string, which
    names the peer and the layer that ended the call), with the seconds since the dial."""

    def failed(self, how: str, told: str = "") -> None:
        self.failures[how] = self.failures.get(how, 0) + 1
        said = self.samples.setdefault(how, [])
        if told and len(said) < SAMPLES_PER_KIND:
            said.append(told)


class SessionEnded(Exception):
    """The controller ended the session (or refused it without a gRPC status)."""


class SimulatedAgent:
    def __init__(
        self,
        vm_id: str,
        credentials: grpc.ChannelCredentials,
        target: str,
        counters: Counters,
        hook: CommandHook,
    ) -> None:
        self.vm_id = vm_id
        self._credentials = credentials
        self._target = target
        self._counters = counters
        self._hook = hook
        self._hello = agent_pb2.Hello(
            vm_id=vm_id,
            name=vm_id,
            service="fleet",
            region="sim",
            hostname=f"{vm_id}.sim",
            agent_version=coffer_version(),
            disks=[agent_pb2.DiskInfo(name="root", path="/dev/vda", size_bytes=DISK_BYTES)],
        )
        # Its own subchannel pool: channels of one process share nothing, as separate VMs.
        self._options = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]

    async def run(self, ramp: float = 0.0) -> None:
        """Dial (first after a random part of `ramp` seconds), and again whenever it ends."""
        if ramp:
            await asyncio.sleep(random.random() * ramp)
        delays = RECONNECT.delays()
        while True:
            retry_after: float | None = None
            accepted_at: float | None = None
            self._counters.attempts += 1
            dialled = time.monotonic()
            try:
                async with grpc.aio.secure_channel(
                    self._target, self._credentials, options=self._options
                ) as channel:
                    call = agent_pb2_grpc.AgentServiceStub(channel).Session()
                    await say_hello(call, agent_pb2.AgentMessage(hello=self._hello))
                    first = await call.read()
                    if first is grpc.aio.EOF or not first.HasField("accepted"):
                        raise SessionEnded()
                    accepted_at = time.monotonic()
                    self._counters.sessions += 1
                    self._counters.in_session += 1
                    try:
                        await self._session(call, first.accepted)
                    finally:
                        self._counters.in_session -= 1
            # The session's task group raises what ended it as a group.
            except* grpc.RpcError as group:
                first = group.exceptions[0]
                error = from_rpc_error(first)
                retry_after = error.retry_after
                if isinstance(error, ControllerBusy):
                    self._counters.refused += 1
                if accepted_at is None:
                    self._counters.failed(_failure(first), _told(first, dialled))
            # A write after the call ended (the controller or the transport ended it first).
            except* (SessionEnded, asyncio.InvalidStateError):
                if accepted_at is None:
                    self._counters.failed("ended before its acceptance")
            if accepted_at is not None and time.monotonic() - accepted_at >= HEALTHY_SESSION:
                delays = RECONNECT.delays()
            await asyncio.sleep(after_refusal(next(delays), retry_after))

    async def _session(
        self, call: grpc.aio.StreamStreamCall, accepted: agent_pb2.SessionAccepted
    ) -> None:
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        interval = max(accepted.heartbeat_interval_ms, 500) / 1000
        async with asyncio.TaskGroup() as tasks:
            writer = tasks.create_task(self._write(call, outbox))
            beats = tasks.create_task(self._heartbeat(outbox, interval))
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        raise SessionEnded()
                    kind = message.WhichOneof("kind")
                    if kind in ("backup", "restore", "file_recovery"):
                        tasks.create_task(self._command(message, outbox))
                    elif kind == "displaced":
                        raise SessionEnded()
            finally:
                writer.cancel()
                beats.cancel()

    async def _command(
        self, message: agent_pb2.ControllerMessage, outbox: asyncio.Queue[agent_pb2.AgentMessage]
    ) -> None:
        result = await self._hook(message)
        if result is not None:
            self._counters.commands += 1
            outbox.put_nowait(agent_pb2.AgentMessage(result=result))

    @staticmethod
    async def _write(
        call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue[agent_pb2.AgentMessage]
    ) -> None:
        while True:
            await call.write(await outbox.get())

    @staticmethod
    async def _heartbeat(outbox: asyncio.Queue[agent_pb2.AgentMessage], interval: float) -> None:
        sequence = 0
        while True:
            await asyncio.sleep(interval)
            sequence += 1
            outbox.put_nowait(
                agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sequence=sequence))
            )


def _failure(error: grpc.RpcError) -> str:
    """A failed attempt's kind: its status code and the first words of its details."""
    code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
    details = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
    return f"{code.name if code else 'unknown'}: {(details or '')[:48]}"


def _told(error: grpc.RpcError, dialled: float) -> str:
    told = error.debug_error_string() if isinstance(error, grpc.aio.AioRpcError) else str(error)
    return f"after {time.monotonic() - dialled:.1f} s: {told[:400]}"


def credentials(certs: Path, ca: bytes, vm_id: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=(certs / f"{vm_id}.key").read_bytes(),
        certificate_chain=(certs / f"{vm_id}.crt").read_bytes(),
    )


async def report(counters: Counters) -> None:
    while True:
        print(json.dumps({"t": time.time(), **asdict(counters)}), flush=True)
        await asyncio.sleep(REPORT_SECONDS)


async def commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve(args: argparse.Namespace) -> None:
    ca = (args.certs / "ca.crt").read_bytes()
    counters = Counters()
    hook = answer(args.commands, args.command_delay)
    agents = [
        SimulatedAgent(
            vm_name(n), credentials(args.certs, ca, vm_name(n)), args.target, counters, hook
        )
        for n in range(args.first, args.first + args.count)
    ]
    running: list[asyncio.Task[None]] = []
    reader = await commands()
    async with asyncio.timeout(args.max_seconds), asyncio.TaskGroup() as group:
        reporting = group.create_task(report(counters))
        try:
            while line := (await reader.readline()).decode().strip():
                word, _, argument = line.partition(" ")
                if word == "connect" and not running:
                    ramp = float(argument or 0)
                    running = [group.create_task(agent.run(ramp)) for agent in agents]
                elif word == "drop" and running:
                    # `drop N SECONDS`: this worker's first N agents hang up and dial again,
                    # each within SECONDS (agents that blip while jobs wait for them).
                    count, _, within = argument.partition(" ")
                    dropped = running[: int(count)]
                    for task in dropped:
                        task.cancel()
                    await asyncio.gather(*dropped, return_exceptions=True)
                    ramp = float(within or 0)
                    for n in range(len(dropped)):
                        running[n] = group.create_task(agents[n].run(ramp))
                elif line == "disconnect":
                    for task in running:
                        task.cancel()
                    await asyncio.gather(*running, return_exceptions=True)
                    running = []
                elif line == "stop":
                    break
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            reporting.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--certs", type=Path, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--commands", choices=("fail", "done", "silent"), default="fail")
    parser.add_argument("--command-delay", type=float, default=0.0)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(TimeoutError, KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
