"""Option values the ``fleet`` commands check while parsing, so that a bad one is
refused, naming its flag (exit status 2), before a simulator, a vCenter session or
a listener is started."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable

from fleet.errors import ConfigError


def parse_listen(value: str, key: str = "--listen", *,
                 any_port: bool = True) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) with a numeric port: 0..65535, or
    1..65535 unless ``any_port`` (a scraper must know the port). HOST is an IP
    address or ``localhost``."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{value!r} is not HOST:PORT (like 127.0.0.1:9100)", key=key)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"{host!r} is not an IP address", key=key) from None
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"port {port_s!r} is not a number", key=key) from None
    low = 0 if any_port else 1
    if not low <= port <= 65535:
        raise ConfigError(f"port {port} is out of range {low}..65535", key=key)
    return host, port


def tcp_port(text: str) -> int:
    """``--metrics-port N``: a TCP port 1..65535 (argparse type)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1..65535)")
    return port


def checked(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a parser that raises ConfigError: argparse then names
    the flag itself ("argument --metrics-listen: ...")."""

    def convert(text: str) -> object:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert
