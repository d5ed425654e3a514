"""A terminal chat with a running Switchboard, through the official openai SDK.

    python -m tools.chat --url ws://127.0.0.1:8080/v1/realtime --key sk-sb-...

Each line you type is one turn; the reply streams as it arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from openai import AsyncOpenAI


async def chat(url: str, key: str, model: str) -> None:
    base = url.removesuffix("/realtime")
    client = AsyncOpenAI(
        api_key=key, base_url=base.replace("ws", "http", 1), websocket_base_url=base
    )
    async with client.realtime.connect(model=model) as connection:
        created: Any = await connection.recv()
        print(f"connected: session {created.session.id}")
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            item: Any = {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": line.strip()}],
            }
            await connection.conversation.item.create(item=item)
            await connection.response.create()
            async for event in connection:
                if event.type == "response.output_text.delta":
                    print(event.delta, end="", flush=True)
                elif event.type == "error":
                    print(f"\n[error {event.error.code}] {event.error.message}")
                elif event.type == "response.done":
                    usage = event.response.usage
                    tokens = f"{usage.input_tokens} in / {usage.output_tokens} out" if usage else ""
                    print(f"\n[{event.response.status}; {tokens}]")
                    break
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080/v1/realtime")
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", default="gpt-realtime")
    args = parser.parse_args()
    asyncio.run(chat(args.url, args.key, args.model))


if __name__ == "__main__":
    main()
