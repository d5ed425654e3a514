"""The demo page (tools/demo) in a real headless Chromium (Debian's /usr/bin/chromium,
driven by Playwright): a streamed reply, a cut mid-response that the SDK resumes
with the same final text, a server-side tool's card, no console errors, and no
key in the page or its requests (only the `ek_` secret).

With SWITCHBOARD_UPDATE_SCREENSHOT=1 the test saves the README's screenshot,
docs/images/demo.png."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from tests.clients.test_python_sdk import uninterrupted
from tools.stack import ROOT, Stack

CHROMIUM = "/usr/bin/chromium"
STORY = 'Tell me a long story. [[sim {"tokens": 90, "token_delay_ms": 30}]]'
TOOL = (
    'What is 6*7? [[sim {"tool_calls": [{"name": "calculate", '
    '"arguments": {"expression": "6*7"}}]}]]'
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox"], headless=True
        )
        yield browser
        await browser.close()


class Watch:
    """Everything the page said and asked, to look for errors and keys."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.responses: list[Any] = []
        self.sockets: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("request", self._request)
        page.on("response", lambda response: self.responses.append(response))
        page.on("websocket", lambda ws: self.sockets.append(ws.url))

    def _request(self, request: Any) -> None:
        self.requests.append(
            f"{request.method} {request.url} {request.headers} {request.post_data}"
        )


async def test_the_demo_page_streams_resumes_a_cut_and_shows_a_tool(
    stack: Stack, browser: Browser
) -> None:
    expected = await uninterrupted(stack, STORY)
    page = await browser.new_page(viewport={"width": 1000, "height": 900})
    watch = Watch(page)
    await page.goto(stack.demo_url)
    await expect(page.locator("#state")).to_have_attribute("data-state", "connected")

    # A long answer, cut mid-response.
    await page.get_by_role("button", name="A long answer").click()
    await page.get_by_role("button", name="Send").click()
    reply = page.locator("li.turn.assistant").last
    await expect(reply).to_have_attribute("data-status", "streaming")
    await expect(reply.locator(".text")).to_have_text(re.compile(r"(\S+\s+){8}"))
    await page.get_by_role("button", name="Cut the connection").click()
    await expect(reply).to_have_attribute("data-status", "completed", timeout=30_000)
    assert await reply.locator(".text").text_content() == expected
    await expect(reply.locator(".badge.resumed")).to_be_visible()
    assert int(await reply.get_attribute("data-ttft-ms") or "-1") >= 0
    await expect(page.locator("#counts")).to_contain_text("resumes 1")

    # A server-side tool, rendered as a card with its result.
    await page.get_by_role("button", name="A server-side tool").click()
    await page.get_by_role("button", name="Send").click()
    card = page.locator("li.tool[data-tool='calculate']")
    await expect(card.locator(".result")).to_have_text(re.compile(r"42"), timeout=30_000)
    await expect(page.locator("li.turn.assistant").last).to_have_attribute(
        "data-status", "completed", timeout=30_000
    )

    if os.environ.get("SWITCHBOARD_UPDATE_SCREENSHOT") == "1":
        await page.screenshot(path=str(ROOT / "docs" / "images" / "demo.png"), full_page=True)

    # The event log expands.
    await page.locator("#log-panel > summary").click()
    first = page.locator("#log > li").first
    await first.locator("summary").click()
    await expect(first.locator("pre")).to_contain_text('"type": "session.created"')

    # Phone width: nothing wider than the screen.
    await page.set_viewport_size({"width": 375, "height": 800})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375

    # No console errors; no key anywhere, only ek_ secrets, and only from /token.
    assert watch.errors == []
    html = await page.content()
    bodies = [await r.text() for r in watch.responses if r.url.endswith("/token")]
    assert bodies and all('"value": "ek_' in body for body in bodies)
    for text in [html, *watch.requests, *watch.sockets, *bodies]:
        assert stack.dev_key not in text
        assert not re.search(r"sk-[A-Za-z0-9_-]{8,}", text), text[:200]
    assert all("ek_" not in url for url in watch.sockets)  # the secret rides a subprotocol
    await page.close()
