"""The private-address rule of webhook destinations: pure checks, no sockets."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from switchboard.toolexec.addresses import (
    AddressGuard,
    DestinationRefused,
    GuardedResolver,
    non_public_kind,
    normalize_host,
)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("10.0.0.5", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),  # shared (carrier-grade NAT) space
        ("192.0.2.1", "private"),  # documentation
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("fec0::1", "private"),  # deprecated site-local
        ("ff02::1", "multicast"),
        ("2001:db8::1", "private"),
        ("::ffff:10.0.0.5", "private"),  # IPv4-mapped
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:a00:5::", "private"),  # 6to4 of 10.0.0.5
        ("64:ff9b::a00:5", "private"),  # NAT64 of 10.0.0.5
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),  # DNS64 answer for a public host
    ],
)
def test_non_public_kind(address: str, kind: str | None) -> None:
    assert non_public_kind(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize(
    ("host", "normal"),
    [("LOCALHOST.", "localhost"), ("[0::1]", "::1"), (" Tools.Example ", "tools.example")],
)
def test_normalize_host(host: str, normal: str) -> None:
    assert normalize_host(host) == normal


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("10.0.0.5", "webhook destination 10.0.0.5 is a private address"),
        ("[::1]", "webhook destination ::1 is a loopback address"),
        ("127.1", "webhook destination 127.1 is not a valid IP address"),
        ("2130706433", "webhook destination 2130706433 is not a valid IP address"),
    ],
)
def test_literals_are_checked(host: str, message: str) -> None:
    with pytest.raises(DestinationRefused) as info:
        AddressGuard().check_literal(host)
    assert str(info.value) == message


def test_names_and_exempt_literals_pass_the_literal_check() -> None:
    guard = AddressGuard(["127.0.0.1", "[0::1]"])
    guard.check_literal("tools.example.com")
    guard.check_literal("127.0.0.1")
    guard.check_literal("::1")
    guard.check_literal("8.8.8.8")
    guard.allow_private([])
    with pytest.raises(DestinationRefused):
        guard.check_literal("127.0.0.1")


class Fixed(AbstractResolver):
    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        return None


async def test_the_resolver_refuses_a_name_with_any_private_answer() -> None:
    resolver = GuardedResolver(AddressGuard(), Fixed("93.184.216.34", "169.254.169.254"))
    with pytest.raises(DestinationRefused, match=r"resolves to 169\.254\.169\.254, a link-local"):
        await resolver.resolve("rebind.example", 80)


async def test_the_resolver_returns_public_answers_and_exempt_names_unchanged() -> None:
    public = GuardedResolver(AddressGuard(), Fixed("93.184.216.34"))
    assert [r["host"] for r in await public.resolve("ok.example", 443)] == ["93.184.216.34"]
    exempt = GuardedResolver(AddressGuard(["tools.internal"]), Fixed("10.0.0.5"))
    assert [r["host"] for r in await exempt.resolve("Tools.Internal.", 80)] == ["10.0.0.5"]
