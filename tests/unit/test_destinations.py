"""The destination policy's decisions (pure): built-in ranges, embedded IPv4, allow/deny
precedence, host names and wildcards. No address here is ever connected to."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from flowforge_orchestrator.config import Settings
from flowforge_orchestrator.core.destinations import (
    DEFAULT_DENIED,
    DestinationPolicy,
    allow_loopback,
    parse_entries,
)

DEFAULT = DestinationPolicy()


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("169.254.169.254", "link-local, where cloud metadata lives (169.254.0.0/16)"),
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local (fe80::/10)"),
        ("fe80::1%2", "link-local"),  # a scoped address, as getaddrinfo gives it
        ("fd00:ec2::254", "the cloud metadata service (fd00:ec2::254/128)"),
        ("127.0.0.1", "loopback (127.0.0.0/8)"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback (::1/128)"),
        ("0.0.0.0", "unspecified (0.0.0.0/8)"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified (::/128)"),
        ("224.0.0.1", "multicast (224.0.0.0/4)"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast (ff00::/8)"),
        ("255.255.255.255", "broadcast (255.255.255.255/32)"),
        # IPv4 inside IPv6: mapped, compatible, NAT64.
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("::127.0.0.1", "loopback"),
        ("::a9fe:a9fe", "link-local"),
        ("64:ff9b::a9fe:a9fe", "link-local"),
        ("64:ff9b::7f00:1", "loopback"),
    ],
)
def test_built_in_ranges_are_denied(address: str, why: str) -> None:
    verdict = DEFAULT.check("some.host", address)
    assert not verdict.allowed
    assert why in verdict.reason
    assert "denied by default" in verdict.reason and "FLOWFORGE_HTTP_ALLOW" in verdict.reason


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "fd12:3456::1",  # unique local, but not the metadata address
        "fd00:ec2::253",
        "93.184.216.34",
        "2606:2800:220:1::1",
        "::ffff:10.0.0.1",
        "169.253.255.255",
        "169.255.0.0",
        "128.0.0.1",
        "1.0.0.0",
        "223.255.255.255",
        "240.0.0.1",
    ],
)
def test_other_addresses_private_ones_included_are_allowed(address: str) -> None:
    assert DEFAULT.check("svc.internal", address).allowed


@pytest.mark.parametrize("written", ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "017700000001"])
def test_numeric_host_forms_are_judged_on_the_address_they_resolve_to(written: str) -> None:
    # These are IP literals that `inet_aton` reads: no DNS query is made to resolve them.
    [address] = {info[4][0] for info in socket.getaddrinfo(written, 80, type=socket.SOCK_STREAM)}
    assert address == "127.0.0.1"
    verdict = DEFAULT.check(written, address)
    assert not verdict.allowed and "loopback" in verdict.reason


def test_every_built_in_range_is_tested() -> None:
    names = {str(network) for network, _ in DEFAULT_DENIED}
    assert names == {
        "169.254.0.0/16",
        "fe80::/10",
        "fd00:ec2::254/128",
        "127.0.0.0/8",
        "::1/128",
        "0.0.0.0/8",
        "::/128",
        "224.0.0.0/4",
        "ff00::/8",
        "255.255.255.255/32",
    }


def test_an_allow_entry_opens_a_built_in_range() -> None:
    policy = DestinationPolicy.parse(allow="127.0.0.0/8, ::1")
    assert policy.check("localhost", "127.0.0.1").allowed
    assert policy.check("localhost", "::1").allowed
    assert policy.check("localhost", "::ffff:127.0.0.1").allowed  # the mapped form too
    verdict = policy.check("x", "169.254.169.254")
    assert not verdict.allowed and "link-local" in verdict.reason  # only what was allowed
    assert (
        policy.check("x", "127.0.0.1").reason == "allowed by '127.0.0.0/8' in FLOWFORGE_HTTP_ALLOW"
    )


def test_a_deny_entry_wins_over_an_allow_entry_and_closes_private_ranges() -> None:
    policy = DestinationPolicy.parse(deny="10.0.0.0/8,127.0.0.2", allow="10.1.0.0/16,127.0.0.0/8")
    verdict = policy.check("db.internal", "10.1.2.3")
    assert not verdict.allowed
    assert verdict.reason == "denied by '10.0.0.0/8' in FLOWFORGE_HTTP_DENY"
    assert not policy.check("h", "::ffff:10.9.9.9").allowed  # mapped form of a denied one
    assert not policy.check("h", "127.0.0.2").allowed
    assert policy.check("h", "127.0.0.3").allowed
    assert policy.check("h", "192.168.0.1").allowed


def test_host_names_and_wildcards_match_the_host_as_written() -> None:
    policy = DestinationPolicy.parse(
        deny="evil.example.com, *.blocked.test", allow="metadata.internal, *.svc.local"
    )
    assert not policy.check("EVIL.example.com.", "93.184.216.34").allowed
    assert not policy.check("a.b.blocked.test", "93.184.216.34").allowed
    assert policy.check("blocked.test", "93.184.216.34").allowed  # `*.` means under it
    assert policy.check("notblocked.test", "93.184.216.34").allowed
    # An allowed name may go where a built-in range would deny: the operator said so.
    assert policy.check("metadata.internal", "169.254.169.254").allowed
    assert policy.check("api.svc.local", "127.0.0.1").allowed
    assert not policy.check("svc.local.attacker.test", "127.0.0.1").allowed
    assert not policy.check("other.internal", "169.254.169.254").allowed


def test_a_deny_name_wins_over_an_allowed_address() -> None:
    policy = DestinationPolicy.parse(deny="*.example.com", allow="127.0.0.0/8")
    verdict = policy.check("api.example.com", "127.0.0.1")
    assert not verdict.allowed and "'*.example.com' in FLOWFORGE_HTTP_DENY" in verdict.reason


def test_something_that_is_not_an_address_is_denied() -> None:
    assert not DEFAULT.check("h", "not-an-ip").allowed


@pytest.mark.parametrize(
    ("text", "bad"),
    [("10.0.0.0/8, ex ample.com", "ex ample.com"), ("*", "*"), ("a.*.com", "a.*.com")],
)
def test_a_bad_entry_is_named_with_its_setting(text: str, bad: str) -> None:
    with pytest.raises(ValueError) as info:
        DestinationPolicy.parse(deny=text)
    assert f"FLOWFORGE_HTTP_DENY: {bad!r} is neither" in str(info.value)


def test_entries_parse_cidrs_addresses_and_names() -> None:
    entries = parse_entries(" 10.0.0.1/8 ,, ::1, Api.Example.COM. ,*.x.test ")
    assert [str(n) for n, _ in entries.networks] == ["10.0.0.0/8", "::1/128"]
    assert entries.names == ("api.example.com", "*.x.test")


def test_allow_loopback_adds_to_what_is_there() -> None:
    assert allow_loopback("") == "127.0.0.0/8,::1"
    assert allow_loopback(" 10.0.0.0/8 ") == "10.0.0.0/8,127.0.0.0/8,::1"
    policy = DestinationPolicy.parse(deny="127.0.0.1", allow=allow_loopback(""))
    assert not policy.check("localhost", "127.0.0.1").allowed  # a deny entry still wins
    assert policy.check("localhost", "127.0.0.2").allowed


def test_settings_refuse_a_bad_entry_at_startup() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(http_allow="127.0.0.0/8,loc alhost")
    assert "FLOWFORGE_HTTP_ALLOW: 'loc alhost' is neither" in str(info.value)
    assert Settings(http_deny=" 10.0.0.0/8 , *.internal").http_deny == " 10.0.0.0/8 , *.internal"
