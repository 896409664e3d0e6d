"""Which client a request comes from: the peer address, or X-Forwarded-For when the peer is
a trusted proxy; and the address form rate limits count by.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from gpuproxy_proxy.http.request import ClientRequest

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=64)
def parse_networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _networks(trusted: Iterable[str] | Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    items = tuple(trusted)
    if items and isinstance(items[0], str):
        return parse_networks(tuple(str(i) for i in items))
    return tuple(i for i in items if not isinstance(i, str))


def client_ip(request: ClientRequest, trusted_proxies: Iterable[str] | Iterable[IPNetwork]) -> str:
    """The client's address: X-Forwarded-For is honoured only when the peer is a trusted proxy,
    walking right to left past trusted hops to the first untrusted one."""
    peer = request.remote or ""
    networks = _networks(trusted_proxies)
    if not networks:
        return peer

    def trusted(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(addr in net for net in networks)

    current = _ip(peer)
    if current is None or not trusted(current):
        return peer
    headers = request.headers.getall("X-Forwarded-For", [])
    hops = [hop for header in headers for hop in header.split(",")]
    for hop in reversed(hops):
        addr = _ip(hop)
        if addr is None:
            break  # garbage cannot be trusted: stop at the last hop we could verify
        current = addr
        if not trusted(addr):
            break
    return str(current)


@lru_cache(maxsize=4096)
def ip_scope_key(ip: str) -> str:
    """IPv4 addresses count one by one; IPv6 per /64, the smallest block one subscriber
    gets, so rotating addresses inside it does not multiply the budget."""
    if ":" not in ip:
        return ip
    addr = _ip(ip)
    if addr is None or addr.version == 4:
        return ip if addr is None else str(addr)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


def peer_trusted(peer: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether the connection's peer is one of the trusted proxies (whose X-Forwarded-*,
    Forwarded and X-Real-IP headers are passed on)."""
    if not networks or not peer:
        return False
    addr = _ip(peer)
    return addr is not None and any(addr in net for net in networks)
