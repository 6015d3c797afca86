"""IP admission: CIDR lists (IPv4 and IPv6) and the client address behind trusted proxies.

Addresses are always `ipaddress` objects; strings only appear when an address is
written to a log. IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, seen as peers when
listening on `::`) are treated as the IPv4 address they carry, in peers, header hops
and list entries alike (`::ffff:10.0.0.0/104` is `10.0.0.0/8`), so they always match.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# An IPv6 client is one /64 (what a single host or home is given), so a per-address budget
# counts the /64: one subscriber cannot use 2^64 addresses to get 2^64 budgets.
IPV6_CLIENT_PREFIX = 64


def parse_network(value: str) -> IPNetwork:
    """`10.0.0.0/8`, `2001:db8::/32` or a bare address (a /32 or /128). Raises ValueError, clearly."""
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IP address or CIDR network") from None
    return normalise_network(network)


def normalise_network(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it covers (`10.0.0.0/8`).

    Peers are normalised the same way (`parse_ip`), so a mapped entry would otherwise never match.
    """
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(parse_network(v) for v in values)


def parse_ip(value: str) -> IPAddress | None:
    """An address from a socket peer or a header hop; None if it is not one."""
    try:
        ip = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_bucket(ip: IPAddress | None) -> str:
    """The key under which per-client budgets count `ip`: the address itself, or its /64 for IPv6."""
    if ip is None:
        return ""
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)


def in_networks(ip: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    # A v4 address is never "in" a v6 network (and vice versa): `in` just says False.
    return any(ip in net for net in networks)


@dataclass(frozen=True, slots=True)
class IPPolicy:
    """The global lists. Empty allow = allow all; deny wins over allow."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = ()

    @property
    def needs_address(self) -> bool:
        """Whether admission looks at the address at all (else the hot path skips parsing it)."""
        return bool(self.allow or self.deny or self.trusted_proxies)

    def admits(self, ip: IPAddress | None) -> bool:
        if ip is None:
            return not (self.allow or self.deny)
        if self.deny and in_networks(ip, self.deny):
            return False
        return not self.allow or in_networks(ip, self.allow)

    def client_ip(self, peer: str | None, forwarded_for: Sequence[bytes] = ()) -> IPAddress | None:
        """The TCP peer, or, when the peer is a trusted proxy, the right-most untrusted X-Forwarded-For hop.

        Hops are read right to left (each proxy appends the address it saw), skipping
        trusted proxies; the first other hop is the client. Anything a client wrote
        further left is ignored, so it cannot choose its own address. A hop that is
        not an address ends the walk with None (unknown: refused when lists are set).
        """
        ip = parse_ip(peer) if peer else None
        if ip is None or not self.trusted_proxies or not in_networks(ip, self.trusted_proxies):
            return ip
        hops = [hop for value in forwarded_for for hop in value.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if not hop.strip():
                continue
            hop_ip = parse_ip(hop)
            if hop_ip is None:
                return None
            ip = hop_ip
            if not in_networks(hop_ip, self.trusted_proxies):
                return hop_ip
        return ip  # every hop is a trusted proxy: the left-most one made the request
