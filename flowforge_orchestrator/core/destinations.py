"""Where http steps may connect: the destination policy, decided for each resolved address.

Rules, in order (the first that matches decides):

1. an entry of `http_deny` (FLOWFORGE_HTTP_DENY) matches: denied;
2. an entry of `http_allow` (FLOWFORGE_HTTP_ALLOW) matches: allowed;
3. a built-in range holds the address: denied (link-local, where cloud metadata lives,
   loopback, unspecified, multicast, broadcast, `fd00:ec2::254`);
4. otherwise allowed: private ranges are where internal services live.

Entries are comma-separated CIDRs (`10.0.0.0/8`), addresses (`192.0.2.7`, `::1`) and host
names (`api.example.com`, or `*.example.com` for any name under it). A CIDR or an address
matches the resolved address; a name matches the host as the URL wrote it. An IPv6 address
that carries an IPv4 one (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64
`64:ff9b::a.b.c.d`) is judged as both. Pure: the connect-time check that calls this is in
`steps/http_client.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

__all__ = [
    "DEFAULT_DENIED",
    "LOOPBACK",
    "DestinationPolicy",
    "Entries",
    "Verdict",
    "allow_loopback",
    "parse_entries",
]

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

DEFAULT_DENIED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ip_network(cidr), what)
    for cidr, what in (
        ("169.254.0.0/16", "link-local, where cloud metadata lives"),
        ("fe80::/10", "link-local"),
        ("fd00:ec2::254/128", "the cloud metadata service"),
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("0.0.0.0/8", "unspecified"),
        ("::/128", "unspecified"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("255.255.255.255/32", "broadcast"),
    )
)
LOOPBACK = ("127.0.0.0/8", "::1")
_NAT64 = ip_network("64:ff9b::/96")
_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


@dataclass(frozen=True)
class Verdict:
    """The decision for one destination, and why, in words fit for an error message."""

    allowed: bool
    reason: str


@dataclass(frozen=True)
class Entries:
    """Parsed entries of one setting; `match` returns the entry that matches, as written."""

    setting: str
    networks: tuple[tuple[IPNetwork, str], ...] = ()
    names: tuple[str, ...] = ()  # lower case, without a trailing dot; `*.x` kept as written

    def match(self, host: str, forms: tuple[IPAddress, ...]) -> str | None:
        for network, written in self.networks:
            if any(form in network for form in forms):
                return written
        for name in self.names:
            if name == host or (name.startswith("*.") and host.endswith(name[1:])):
                return name
        return None


def parse_entries(text: str, setting: str = "FLOWFORGE_HTTP_ALLOW") -> Entries:
    """The entries of a comma-separated setting; ValueError naming the first bad one."""
    networks: list[tuple[IPNetwork, str]] = []
    names: list[str] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            networks.append((ip_network(entry, strict=False), entry))
            continue
        except ValueError:
            pass
        name = entry.lower().rstrip(".")
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"{setting}: {entry!r} is neither a CIDR, an IP address nor a host name "
                "(write '*.example.com' for every name under example.com)"
            )
        names.append(name)
    return Entries(setting, tuple(networks), tuple(names))


def allow_loopback(allow: str | None) -> str:
    """`allow` with loopback added: for the local default, whose servers are on 127.0.0.1."""
    return ",".join(part for part in ((allow or "").strip(), *LOOPBACK) if part)


def _forms(address: IPAddress) -> tuple[IPAddress, ...]:
    """The address, and the IPv4 address an IPv6 one carries (mapped, compatible, NAT64)."""
    if isinstance(address, IPv4Address):
        return (address,)
    value = int(address)
    if address.ipv4_mapped is not None:
        return (address, address.ipv4_mapped)
    if (value >> 32 == 0 and value > 1) or address in _NAT64:  # `::` and `::1` are their own
        return (address, IPv4Address(value & 0xFFFFFFFF))
    return (address,)


@dataclass(frozen=True)
class DestinationPolicy:
    """The rules above. `check` is called once per resolved address of each connection."""

    deny: Entries = Entries("FLOWFORGE_HTTP_DENY")
    allow: Entries = Entries("FLOWFORGE_HTTP_ALLOW")

    @classmethod
    def parse(cls, deny: str | None = None, allow: str | None = None) -> DestinationPolicy:
        """From the settings' text (None: unset); ValueError names the bad entry."""
        return cls(parse_entries(deny or "", "FLOWFORGE_HTTP_DENY"), parse_entries(allow or ""))

    def check(self, host: str, address: str) -> Verdict:
        """May a connection for `host` go to `address` (as the resolver gave it)?"""
        try:
            forms = _forms(ip_address(address))
        except ValueError:
            return Verdict(False, "the resolver gave something that is not an IP address")
        name = host.lower().rstrip(".")
        for entries, allowed in ((self.deny, False), (self.allow, True)):
            written = entries.match(name, forms)
            if written is not None:
                verb = "allowed" if allowed else "denied"
                return Verdict(allowed, f"{verb} by {written!r} in {entries.setting}")
        for network, what in DEFAULT_DENIED:
            if any(form in network for form in forms):
                return Verdict(
                    False,
                    f"{what} ({network}) is denied by default; FLOWFORGE_HTTP_ALLOW can allow it",
                )
        return Verdict(True, "no rule denies it")
