"""gRPC connections between Coffer processes: limits, keepalive, flow control, both ends' options.

Every client channel to the controller (the agent's session and data path, `coffer-agent
doctor`, the `coffer` CLI) and the controller's server are configured here and nowhere else,
so the two ends always agree: the largest message either may send, how a dead peer is noticed,
and that a listening port belongs to one process. Clients open their channel with
`secure_channel` (asyncio) or pass `channel_options` to a synchronous one.
"""

from __future__ import annotations

from typing import Any, Final

import grpc

from shared.tls import TlsFiles, channel_credentials

# The largest message the controller accepts (and a client sends): what the protocol needs,
# no more, since every message is held whole before a handler can refuse it. The largest is
# one upload message: at most 1 MiB of chunks or a single chunk, and a chunk is at most the
# largest chunk size (16 MiB). Index parts and digest lists are 2 MiB, operators' requests
# small. A hostile agent's 30 MiB messages were accepted before (docs/hostile-agent.md).
MAX_CHUNK_BYTES: Final = 16 * 1024 * 1024
MAX_REQUEST_BYTES: Final = MAX_CHUNK_BYTES + 64 * 1024
# The largest message a client accepts (and the controller sends): a download batch (1 MiB
# and one chunk) or a page of a listing, with room to spare.
MAX_REPLY_BYTES: Final = 32 * 1024 * 1024

MAX_STREAMS_PER_CONNECTION: Final = 32
# gRPC core's defaults for the calls a server has received and not taken up yet: past the
# first it refuses new ones at random, past the second all (`server_options`).
CORE_PENDING_CALLS: Final = 1000
CORE_PENDING_CALLS_HARD: Final = 3000
# And at most this many, whatever the descriptor limit (a host may allow millions of
# descriptors, and every waiting call is memory any certificate holder can make it hold).
MAX_PENDING_CALLS: Final = 50_000

# --- keepalive ---------------------------------------------------------------------------
# Both ends ping the other every KEEPALIVE_TIME_MS of silence and drop the connection when an
# answer takes longer than KEEPALIVE_TIMEOUT_MS, so a peer that died without closing its
# socket (VM paused or powered off, process frozen, network cut) is noticed within
# KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS (25 s). A process that is killed is noticed at
# once: its kernel closes the socket.
# Why these values (issue 13): with 10,000 agents every ping is work for the controller (both
# ends ping: at 4 s that was 5,000 pings a second, most of an idle controller's CPU), and a
# 4 s timeout turned a busy second (a reconnect storm on a 2-core machine, pings answered
# late) into sessions cut by the thousand, each of which came back into the storm. 15 s
# between pings costs a fleet of 10,000 about 1,300 pings a second; 10 s to answer one
# outlasts any stall short of a dead peer. A backup job learns its agent is gone within 25 s
# (it was 8 s), which a job that runs for minutes does not notice.
# Why each knob is set (gRPC core's doc/keepalive.md and chttp2_transport.cc):
# - grpc.keepalive_time_ms: pings are off by default on clients (INT_MAX) and every 2 hours
#   on servers.
# - grpc.keepalive_timeout_ms AND grpc.http2.ping_timeout_ms: current gRPC core arms the
#   keepalive watchdog only when keepalive_timeout < ping_timeout, and every ping also gets
#   a ping timeout that defaults to 1 minute once keepalive is on; setting both makes the
#   wait for an answer really KEEPALIVE_TIMEOUT_MS. Measured with grpcio 1.85 (the frozen
#   peer tests in tests/test_tls.py): 8 s with both, 64 s without ping_timeout_ms (at the
#   former 4 s + 4 s).
# - grpc.http2.max_pings_without_data = 0: by default a side stops pinging after 2 pings
#   without sending data or headers, so an idle session (or a server only receiving) would
#   stop being watched.
# - grpc.keepalive_permit_without_calls = 1: keep watching a connection with no RPC in flight
#   (on the server it also accepts the client's pings then instead of counting strikes).
# - server grpc.http2.min_ping_interval_without_data_ms: the server counts a client ping
#   that comes sooner than this (default 5 minutes) as a "ping strike" and sends GOAWAY
#   ENHANCE_YOUR_CALM "too_many_pings" past 2 strikes (strikes reset whenever the server
#   sends data or headers, so an idle stream is what trips it); it must be below the
#   client's KEEPALIVE_TIME_MS, with margin for timer jitter.
# Pings stop while data arrives (the timer restarts on every read), so a busy upload is not
# slowed; only a connection quiet for KEEPALIVE_TIME_MS is probed.
KEEPALIVE_TIME_MS: Final = 15_000
KEEPALIVE_TIMEOUT_MS: Final = 10_000
MIN_CLIENT_PING_INTERVAL_MS: Final = KEEPALIVE_TIME_MS // 2
# A TLS handshake not finished within this long is dropped, so that connections stuck in a
# handshake (a storm's backlog, a slow or hostile client) do not hold descriptors for gRPC's
# default of 2 minutes.
HANDSHAKE_TIMEOUT_MS: Final = 20_000


# --- flow control ------------------------------------------------------------------------
# How many bytes a stream may have sent and not yet read by the receiving process. gRPC's
# default grows each stream's window with its estimate of the connection's bandwidth-delay
# product (BDP probing), to several MiB on loopback: that many bytes wait in the receiver's
# memory, per stream. A fixed window of STREAM_WINDOW_BYTES is enough to keep a stream busy
# (measured, issue 11: a 2 GiB restore's agent peaked at 110 MiB with BDP probing, 107 with a
# fixed 4 MiB window, 99 with 1 MiB; 100 with gRPC's 64 KiB but a quarter more CPU on both
# sides for the window updates). The cost is on long round trips: a stream carries at most a
# window per round trip, 100 MiB/s at 10 ms, so an agent far from its controller backs up
# slower than with BDP probing; agents sit in the controller's data centre.
STREAM_WINDOW_BYTES: Final = 1 << 20


def _flow_control_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
    ]


def _keepalive_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _client_message_sizes() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
    ]


def _server_message_sizes() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_REPLY_BYTES),
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ]


def channel_options(server_name: str | None = None) -> list[tuple[str, Any]]:
    """Options for every client channel to the controller (agent, CLI).

    `server_name` is the name the controller's certificate must carry when it differs from
    the host in the target address (e.g. dialling an IP the certificate does not list).
    """
    options = [*_keepalive_options(), *_flow_control_options(), *_client_message_sizes()]
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def server_options(max_connections: int | None = None) -> list[tuple[str, Any]]:
    """Options for the controller's gRPC server, matching `channel_options`.

    `max_connections`: connections the listener holds at most; past it gRPC closes a new one
    as soon as it is accepted (before its TLS handshake): the cheapest refusal there is, and
    what keeps one listener's clients from taking the descriptors another's need.

    Calls a listener has received but the asyncio server has not taken up yet wait in gRPC
    core's queue. The asyncio server takes one at a time, so while its event loop is busy (a
    storm's sessions, a backup's chunks) the queue grows; past gRPC's default of 1,000 waiting
    calls core refuses new ones at random, and past 3,000 every one, before the controller
    has seen them: the agent reads CANCELLED with no reason and no retry-after. A 10,000-agent
    storm lost 31,000 to 34,000 dials this way (issue 13; 263 of 2,500 sessions dialled at
    once by one simulator process). The controller's own admission (the session gate, the
    per-agent limits) is what decides, with a reason and a retry-after; core's queue is
    bounded by the listener's connections instead: a session from every agent may wait, and
    at most twice that many calls (within `MAX_PENDING_CALLS`).

    `grpc.so_reuseport` is off: gRPC sets SO_REUSEPORT by default, so a second controller
    given the same `listen` would bind the port beside the first and the kernel would share
    the connections between them (operators' calls answered by one or the other). Without it
    the second one's bind fails and it refuses to start.
    """
    return [
        *_keepalive_options(),
        *_flow_control_options(),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        *_server_message_sizes(),
        # Streams one connection may have open at once: an agent needs a handful (session,
        # upload, index, digests, downloads), the CLI one; each may hold a message.
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.so_reuseport", 0),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ] + (_connection_limits(max_connections) if max_connections else [])


def _connection_limits(max_connections: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_allowed_incoming_connections", max_connections),
        # Never below gRPC's own (a listener for a few connections, the operators'), never
        # above MAX_PENDING_CALLS.
        (
            "grpc.server.max_pending_requests",
            min(max(max_connections, CORE_PENDING_CALLS), MAX_PENDING_CALLS),
        ),
        (
            "grpc.server.max_pending_requests_hard_limit",
            min(max(2 * max_connections, CORE_PENDING_CALLS_HARD), 2 * MAX_PENDING_CALLS),
        ),
    ]


def secure_channel(address: str, tls: TlsFiles, server_name: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to the controller at `address`: mutual TLS with `tls`, our options.

    Use as `async with secure_channel(...) as channel`.
    """
    return grpc.aio.secure_channel(
        address, channel_credentials(tls), options=channel_options(server_name)
    )
