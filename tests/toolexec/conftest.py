"""Fixtures of the toolexec tests: a real webhook receiver and a real webhook client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from switchboard.toolexec.webhooks import WebhookClient
from tests.toolexec.receiver import Receiver


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """The signature-checking webhook receiver on 127.0.0.1."""
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def webhooks() -> AsyncIterator[WebhookClient]:
    """A webhook client with its own aiohttp session, closed after the test."""
    client = WebhookClient()
    try:
        yield client
    finally:
        await client.close()
