"""Fixtures shared by the gateway tests: the whole app in-process (test_app.py),
and the official `openai` SDK pointed at it."""

from collections.abc import AsyncIterator

import openai
import pytest

from tests.gateway.test_app import KEY, Gateway, gateway  # noqa: F401


@pytest.fixture
async def sdk(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:  # noqa: F811
    """The official async SDK, its `base_url` at the gateway."""
    async with openai.AsyncOpenAI(
        api_key=KEY, base_url=f"http://{gateway.url}/v1", max_retries=0
    ) as client:
        yield client
