"""Network addresses as configs give them: `host:port`, IPv6 in brackets, a port in range.

A host is a DNS name (RFC 1123 labels), an IPv4 address, or an IPv6 address; in `host:port`
an IPv6 address goes in brackets (`[::1]:7443`), as in URLs and gRPC targets, since its own
colons would otherwise be read as the port's. The parsers raise ValueError with a sentence
that says what is wrong with the text and what it should look like; the config loader turns
it into a problem naming the key.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_PORT = 65535
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Address:
    host: str  # a DNS name or an IP address; IPv6 without brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host(text: str) -> str:
    """`text` as a host: a DNS name or an IP address (IPv6 brackets are taken off)."""
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if not host:
        raise ValueError("the host is empty")
    if host.count(":") == 1:
        raise ValueError(f"{text!r} is not a host name or IP address (a port does not go here)")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{text!r} is not a valid IPv6 address") from None
    labels = host.split(".")
    if labels[-1].isdigit():  # no top-level domain is all digits: meant as IPv4
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{text!r} is not a valid IPv4 address") from None
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"{text!r} is not a host name or IP address (a host name is letters, digits and "
            "'-' in labels separated by '.')"
        )
    return host


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    """`text` as a TCP port, 1-65535 (0 too with `allow_zero`: any free port)."""
    lowest = 0 if allow_zero else 1
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"the port {text!r} is not a number")
    port = int(text)
    if not lowest <= port <= MAX_PORT:
        raise ValueError(f"the port {port} is not within {lowest}-{MAX_PORT}")
    return port


def parse_address(text: str, *, allow_port_zero: bool = False) -> Address:
    """`text` as `host:port` or `[ipv6]:port`."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [IPv6 address]:port, e.g. '[::1]:7443'")
        if not _is_ipv6(host):
            raise ValueError(f"{host!r} in {text!r} is not a valid IPv6 address")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            example = f"127.0.0.1:{text}" if text.isdigit() else f"{text or 'host'}:7443"
            raise ValueError(f"{text!r} is not host:port, e.g. {example!r}")
        if ":" in host:
            if _is_ipv6(host):
                raise ValueError(
                    f"{text!r}: an IPv6 address goes in brackets, e.g. '[{host}]:{port}'"
                )
            raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    try:
        return Address(parse_host(host), parse_port(port, allow_zero=allow_port_zero))
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
