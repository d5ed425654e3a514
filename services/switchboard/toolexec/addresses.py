"""Where webhooks may connect: public addresses only, unless a host is allow-listed.

A webhook URL is tenant configuration, so without this check a tenant could
make toolexec call anything toolexec can reach: the cloud metadata service
(169.254.169.254), the cluster's Redis, other tenants' services. The rule is
on resolved addresses, not on names: a destination is refused when ANY
address it resolves to is private, loopback, link-local, multicast, reserved
or unspecified (IPv4 or IPv6; IPv4 embedded in IPv6 as mapped, 6to4 or NAT64
addresses is judged as the IPv4 it reaches), unless its host is listed in
`allow_private_hosts`.

The check must also be the address used. `GuardedResolver` is the resolver of
the webhook client's connector: it resolves, checks every address, and hands
aiohttp exactly those addresses, so no second lookup can rebind the name to
another address between the check and the connection (the connector's DNS
cache is off, so every new connection is checked against the allow-list in
force). aiohttp skips the resolver for IP literals; `AddressGuard.check_literal`
covers those before the request is made.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class DestinationRefused(OSError):
    """A webhook destination that is not public and not allow-listed.

    An `OSError` so that, raised inside the resolver, aiohttp reports it as a
    connection failure (wrapped in `ClientConnectorDNSError`) without
    attempting any connection. The message names the host and address only.
    """


def non_public_kind(address: IPAddress) -> str | None:
    """Why an address is not a public destination, or None when it is.

    Returns:
        "unspecified", "loopback", "link-local", "multicast", "private" or
        "reserved"; addresses that are not globally routable for any other
        reason (shared address space, documentation ranges) are "private".
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            kind = non_public_kind(embedded)
            # Mapped and NAT64 addresses reach exactly their IPv4 (DNS64 gives
            # every public host a 64:ff9b:: address): judge them by it alone.
            if kind is not None or address.ipv4_mapped is not None or address in _NAT64:
                return kind
        if address.is_site_local:
            return "private"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "private"
    return None


def normalize_host(host: str) -> str:
    """A host as allow-lists compare it: lower case, no brackets or trailing dot,
    IP literals in their canonical form (so `0::1` equals `::1`)."""
    text = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def looks_like_ip(host: str) -> bool:
    """aiohttp's own test for an IP literal, which it connects to without a lookup."""
    return ":" in host or host.replace(".", "").isdigit()


class AddressGuard:
    """Decides which webhook destinations may be contacted.

    Args:
        allow_private_hosts: hosts (names or IP literals) exempt from the
            private-address rule, e.g. an in-cluster tool service.
    """

    def __init__(self, allow_private_hosts: Iterable[str] = ()) -> None:
        self._exempt = frozenset(normalize_host(h) for h in allow_private_hosts)

    def allow_private(self, hosts: Iterable[str]) -> None:
        """Replace the allow-list (a reloaded tools file); new connections use it."""
        self._exempt = frozenset(normalize_host(h) for h in hosts)

    def is_exempt(self, host: str) -> bool:
        return normalize_host(host) in self._exempt

    def check_literal(self, host: str) -> None:
        """Refuse an IP-literal host that is not public, before any request.

        Hosts aiohttp would treat as IP literals but that are not canonical
        addresses (`127.1`, `2130706433`) are refused too: the socket layer
        could still map them onto an address.

        Raises:
            DestinationRefused: naming the host and why.
        """
        if not looks_like_ip(host) or self.is_exempt(host):
            return
        try:
            address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise DestinationRefused(
                f"webhook destination {host} is not a valid IP address"
            ) from None
        kind = non_public_kind(address)
        if kind is not None:
            raise DestinationRefused(f"webhook destination {address} is {_a(kind)} address")

    def check_resolved(self, host: str, addresses: Iterable[str]) -> None:
        """Refuse `host` when any of its resolved addresses is not public.

        Raises:
            DestinationRefused: naming the host, the first bad address and why.
        """
        if self.is_exempt(host):
            return
        for text in addresses:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                raise DestinationRefused(
                    f"webhook destination {host} resolves to something that is not an IP address"
                ) from None
            kind = non_public_kind(address)
            if kind is not None:
                raise DestinationRefused(
                    f"webhook destination {host} resolves to {address}, {_a(kind)} address"
                )


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that only returns vetted addresses.

    Args:
        guard: the rule applied to every resolution.
        base: the resolver that does the lookup; aiohttp's `ThreadedResolver`
            (the system's getaddrinfo) by default. Tests pass one that maps
            made-up names to 127.0.0.1.
    """

    def __init__(self, guard: AddressGuard, base: AbstractResolver | None = None) -> None:
        self._guard = guard
        self._base = base if base is not None else ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve `host`, then refuse it unless every address is allowed.

        Raises:
            DestinationRefused: an address is not public and the host is not exempt.
            OSError: the lookup failed (`socket.gaierror`).
        """
        results = await self._base.resolve(host, port, family)
        self._guard.check_resolved(host, (result["host"] for result in results))
        return results

    async def close(self) -> None:
        await self._base.close()


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None
