"""CIDR matching and client-address resolution behind trusted proxies."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from bastion.auth.ipfilter import IPPolicy, client_bucket, in_networks, parse_ip, parse_network, parse_networks


def test_cidr_matching_v4_and_v6() -> None:
    nets = parse_networks(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])
    assert in_networks(ip_address("10.200.1.1"), nets)
    assert not in_networks(ip_address("11.0.0.1"), nets)
    assert in_networks(ip_address("2001:db8:ffff::1"), nets)
    assert not in_networks(ip_address("2001:db9::1"), nets)
    assert in_networks(ip_address("192.0.2.7"), nets) and not in_networks(ip_address("192.0.2.8"), nets)
    # a v4 address never matches a v6 network, and the reverse, without raising
    assert not in_networks(ip_address("::1"), parse_networks(["0.0.0.0/0"]))
    assert not in_networks(ip_address("127.0.0.1"), parse_networks(["::/0"]))


def test_host_bits_are_accepted_and_bad_networks_are_named() -> None:
    assert str(parse_network("10.1.2.3/8")) == "10.0.0.0/8"
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300/8' is not a valid IP address or CIDR network"):
        parse_network("10.0.0.300/8")


def test_ipv4_mapped_ipv6_peer_is_its_ipv4_address() -> None:
    assert parse_ip("::ffff:127.0.0.2") == ip_address("127.0.0.2")
    assert parse_ip("not-an-ip") is None


def test_allow_and_deny() -> None:
    open_policy = IPPolicy()
    assert open_policy.admits(ip_address("203.0.113.1")) and open_policy.admits(None)
    policy = IPPolicy(allow=parse_networks(["10.0.0.0/8"]), deny=parse_networks(["10.9.0.0/16"]))
    assert policy.admits(ip_address("10.1.1.1"))
    assert not policy.admits(ip_address("10.9.1.1")), "deny wins over allow"
    assert not policy.admits(ip_address("192.168.1.1"))
    assert not policy.admits(None), "an unknown address is refused once lists are set"


TRUSTED = IPPolicy(trusted_proxies=parse_networks(["127.0.0.1", "10.0.0.0/8"]))


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        # an untrusted peer's X-Forwarded-For is ignored: it cannot choose its address
        ("198.51.100.7", [b"203.0.113.5"], "198.51.100.7"),
        ("127.0.0.2", [b"203.0.113.5"], "127.0.0.2"),
        # a trusted proxy: the right-most hop that is not a trusted proxy
        ("127.0.0.1", [b"203.0.113.5"], "203.0.113.5"),
        ("127.0.0.1", [b"203.0.113.5, 10.1.1.1"], "203.0.113.5"),
        # the client wrote its own XFF (left part): ignored, the proxy's appended hop counts
        ("127.0.0.1", [b"192.0.2.66, 203.0.113.5"], "203.0.113.5"),
        # several headers are one list, in order
        ("127.0.0.1", [b"192.0.2.66", b"203.0.113.5"], "203.0.113.5"),
        # no header, or only trusted hops: the left-most trusted one
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", [b"10.2.2.2, 10.1.1.1"], "10.2.2.2"),
        # IPv6 hops
        ("127.0.0.1", [b"2001:db8::5"], "2001:db8::5"),
    ],
)
def test_forwarded_for_resolution(peer: str, xff: list[bytes], expected: str) -> None:
    assert TRUSTED.client_ip(peer, xff) == ip_address(expected)


def test_garbage_hop_means_unknown_address() -> None:
    assert TRUSTED.client_ip("127.0.0.1", [b"203.0.113.5, not-an-ip"]) is None
    assert IPPolicy().client_ip(None) is None


def test_ipv4_mapped_entries_match_the_ipv4_clients_they_name() -> None:
    assert parse_network("::ffff:10.0.0.0/104") == parse_network("10.0.0.0/8")
    assert parse_network("::ffff:192.0.2.7") == parse_network("192.0.2.7/32")
    policy = IPPolicy(allow=parse_networks(["::ffff:10.0.0.0/104"]), deny=parse_networks(["::ffff:10.9.9.9"]))
    assert policy.admits(parse_ip("10.1.2.3")) and policy.admits(parse_ip("::ffff:10.1.2.3"))
    assert not policy.admits(parse_ip("10.9.9.9")) and not policy.admits(parse_ip("::ffff:10.9.9.9"))
    assert str(parse_network("::ffff:0:0/95")) == "::fffe:0:0/95", "wider than the mapped range: left as IPv6"


def test_client_buckets_are_addresses_and_ipv6_64s() -> None:
    assert client_bucket(parse_ip("203.0.113.9")) == "203.0.113.9"
    assert client_bucket(parse_ip("::ffff:203.0.113.9")) == "203.0.113.9"
    assert client_bucket(parse_ip("2001:db8:1:2::1")) == client_bucket(parse_ip("2001:db8:1:2:ffff::9"))
    assert client_bucket(parse_ip("2001:db8:1:2::1")) == "2001:db8:1:2::/64"
    assert client_bucket(parse_ip("2001:db8:1:3::1")) != client_bucket(parse_ip("2001:db8:1:2::1"))
    assert client_bucket(None) == ""
