"""Hostile input for the gateway, generated from a seed.

`Hostile(random.Random(seed))` makes what an attacker would send: client frames
(random bytes and text, invalid UTF-8, truncated and deeply nested JSON, every
client event with wrong, missing, huge or odd fields, hostile ids, names and
tool schemas, floods of `response.create` and `response.cancel`), WebSocket
handshakes and HTTP requests. The same seed gives the same input, so a failure
found by `make fuzz` or tests/fuzz is replayed with its seed.
"""

from __future__ import annotations

import base64
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Literal

from switchboard.gateway import client_events, sessions

# Strings that have broken parsers, key builders and log lines elsewhere.
ODD_STRINGS = (
    "",
    " ",
    "\t",
    "\x00",
    "a\x00b",
    "{a}",
    "{",
    "}",
    "*",
    "?",
    "[",
    "../",
    "../../etc/passwd",
    "%00",
    "%s%n",
    "\\",
    '"',
    "'",
    "null",
    "root",
    "é",
    "\u202e",
    "😀",
    "\ufeff",
    "sess_",
    "item_",
    "event_0123456789ab1",
    "sk-sb-not-a-key",
    "ek_not-a-secret",
    "<script>",
    "\r\nX-Injected: 1",
)
EVENT_TYPES = (
    "session.update",
    "conversation.item.create",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "response.create",
    "response.cancel",
)

FrameKind = Literal["text", "bytes", "bad_utf8"]


@dataclass(frozen=True, slots=True)
class Frame:
    """One client frame: a text frame, a binary frame, or a text frame whose
    payload is not UTF-8 (`bad_utf8`, only a real socket can send it)."""

    kind: FrameKind
    data: str | bytes

    def label(self) -> str:
        text = self.data if isinstance(self.data, str) else repr(self.data)
        return f"{self.kind}:{text[:120]!r}"


class Hostile:
    """A generator of hostile input; all of its randomness comes from `rng`."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    # --- values --------------------------------------------------------------------

    def text(self) -> str:
        r = self.rng.random()
        if r < 0.35:
            return self.rng.choice(ODD_STRINGS)
        if r < 0.55:
            return self.rng.choice(("x", "é", "😀", "\x00", "{")) * self.rng.choice(
                (64, 65, 100, 1000, 10_000, 30_000, 70_000)
            )
        length = self.rng.randrange(0, 40)
        return "".join(chr(self._codepoint()) for _ in range(length))

    def _codepoint(self) -> int:
        while True:
            point = self.rng.choice((self.rng.randrange(32, 127), self.rng.randrange(0, 0x110000)))
            if not 0xD800 <= point <= 0xDFFF:  # no lone surrogates in UTF-8
                return point

    def ident(self) -> str:
        if self.rng.random() < 0.5:
            return self.text()
        return self.rng.choice(("item_", "resp_", "call_", "event_")) + self.text()[:70]

    def scalar(self) -> Any:
        return self.rng.choice(
            (
                None,
                True,
                False,
                0,
                -1,
                2**63 - 1,
                2**64,
                -(2**70),
                1.5,
                1e308,
                self.text(),
                self.text(),
            )
        )

    def value(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth > 3 or r < 0.5:
            return self.scalar()
        if r < 0.7:
            return [self.value(depth + 1) for _ in range(self.rng.randrange(0, 4))]
        if r < 0.9:
            return {self.text()[:20]: self.value(depth + 1) for _ in range(self.rng.randrange(4))}
        return self.nested(self.rng.choice((20, 31, 32, 33, 100, 254, 255, 300, 600)))

    def nested(self, depth: int) -> Any:
        value: Any = self.scalar()
        for _ in range(depth):
            value = {"a": value} if self.rng.random() < 0.5 else [value]
        return value

    def maybe(self, good: Any) -> Any:
        """Usually `good`, sometimes a hostile value instead."""
        return good if self.rng.random() < 0.75 else self.value()

    # --- events --------------------------------------------------------------------

    def tool(self) -> Any:
        if self.rng.random() < 0.1:
            return self.value()
        tool: dict[str, Any] = {
            "type": self.maybe("function"),
            "name": self.rng.choice(("lookup", "get_weather", self.text(), self.text())),
        }
        if self.rng.random() < 0.5:
            tool["description"] = self.maybe(self.text())
        if self.rng.random() < 0.7:
            tool["parameters"] = self.maybe(
                {"type": "object", "properties": {self.text()[:30]: {"type": "string"}}}
            )
        return tool

    def tools(self) -> Any:
        count = self.rng.choice((0, 1, 2, 3, 128, 129, 500))
        return self.maybe([self.tool() for _ in range(count)])

    def session(self) -> Any:
        session: dict[str, Any] = {"type": self.maybe("realtime")}
        for name in self.rng.sample(sorted(sessions.SESSION_FIELDS), self.rng.randrange(0, 5)):
            session[name] = self._session_field(name)
        if self.rng.random() < 0.1:
            session[self.text()[:30]] = self.value()
        return self.maybe(session)

    def _session_field(self, name: str) -> Any:
        if name == "tools":
            return self.tools()
        if name == "model":
            return self.maybe("gpt-realtime")
        if name == "instructions":
            return self.maybe("Be brief." * self.rng.choice((1, 8000)))
        if name == "tool_choice":
            return self.maybe(self.rng.choice(("auto", {"type": "function", "name": self.text()})))
        if name == "max_output_tokens":
            return self.maybe(self.rng.choice((1, "inf", 10**9)))
        return self.value()

    def item(self) -> Any:
        kind = self.rng.choice(("message", "message", "function_call", "function_call_output"))
        item: dict[str, Any] = {"type": self.maybe(kind)}
        if self.rng.random() < 0.3:
            item["id"] = self.ident()
        if kind == "message":
            item["role"] = self.maybe(self.rng.choice(("user", "system", "assistant")))
            # Message text is short: the simulator's replies quote it back.
            part = {"type": self.maybe("input_text"), "text": self.maybe(self.text()[:1000])}
            item["content"] = self.maybe([part] * self.rng.randrange(0, 3))
        else:
            item["call_id"] = self.ident()
            item["name" if kind == "function_call" else "output"] = self.maybe(self.text())
        return self.maybe(item)

    def response(self) -> Any:
        response: dict[str, Any] = {}
        for name in self.rng.sample(
            sorted(client_events.RESPONSE_FIELDS), self.rng.randrange(0, 4)
        ):
            response[name] = self._response_field(name)
        return self.maybe(response)

    def _response_field(self, name: str) -> Any:
        if name == "tools":
            return self.tools()
        if name == "metadata":
            count = self.rng.choice((0, 1, 16, 17, 10_000))
            value = "v" * self.rng.choice((1, 512, 513))
            return self.maybe({self.text()[:70]: self.maybe(value) for _ in range(count)})
        if name == "max_output_tokens":
            return self.maybe(8)
        if name == "conversation":
            return self.maybe("auto")
        return self.value()

    def event(self) -> Any:
        r = self.rng.random()
        if r < 0.05:
            return self.value()
        kind = self.rng.choice(EVENT_TYPES) if r < 0.9 else self.text()
        event: dict[str, Any] = {"type": kind}
        if kind == "session.update":
            event["session"] = self.session()
        elif kind == "conversation.item.create":
            event["item"] = self.item()
            if self.rng.random() < 0.3:
                event["previous_item_id"] = self.maybe(self.ident())
        elif kind in ("conversation.item.delete", "conversation.item.retrieve"):
            event["item_id"] = self.maybe(self.ident())
        elif kind == "response.create" and self.rng.random() < 0.5:
            event["response"] = self.response()
        elif kind == "response.cancel" and self.rng.random() < 0.3:
            event["response_id"] = self.maybe(self.ident())
        if self.rng.random() < 0.1:
            event["event_id"] = self.maybe(self.ident())
        if self.rng.random() < 0.05:
            event[self.text()[:20]] = self.value()
        return event

    # --- frames --------------------------------------------------------------------

    def frame(self) -> Frame:
        r = self.rng.random()
        if r < 0.55:
            return Frame("text", dump(self.event()))
        if r < 0.65:  # a flood: the same create or cancel again and again
            return Frame(
                "text", dump({"type": self.rng.choice(("response.create", "response.cancel"))})
            )
        if r < 0.73:
            text = dump(self.event())
            return Frame("text", text[: self.rng.randrange(0, max(1, len(text)))])
        if r < 0.78:
            depth = self.rng.choice((33, 255, 300, 1023, 1024, 1025, 5000))
            return Frame("text", "[" * depth + "]" * depth)
        if r < 0.85:
            return Frame("text", self.text())
        if r < 0.9:
            return Frame("bytes", self.rng.randbytes(self.rng.randrange(0, 64)))
        if r < 0.904:  # rare: it ends the connection (1007)
            return Frame(
                "bad_utf8",
                b'{"type": "' + self.rng.choice((b"\xff", b"\xc3(", b"\xed\xa0\x80")) + b'"}',
            )
        if r < 0.96:
            return Frame("text", dump(self.event()) + self.rng.choice(("x", "}", "\x00", " {}")))
        return Frame("text", " " * self.rng.choice((10, 1000)) + dump(self.event()))

    # --- handshakes and HTTP requests ------------------------------------------------

    def handshake(self, key: str) -> tuple[str, bytes]:
        """A raw WebSocket handshake (a label, the bytes) against /v1/realtime."""
        nonce = base64.b64encode(os.urandom(16)).decode()
        headers = [
            "Host: 127.0.0.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {nonce}",
            "Sec-WebSocket-Version: 13",
        ]
        query = "model=gpt-realtime"
        label = self.rng.choice(
            (
                "long-query",
                "long-bearer",
                "long-header",
                "many-headers",
                "bad-key",
                "no-key",
                "bad-subprotocol",
                "tenant-key-subprotocol",
                "hostile-resume",
                "hostile-model",
                "odd-header",
                "not-http",
                "bad-version",
                "ok",
            )
        )
        auth = f"Authorization: Bearer {key}"
        if label == "long-query":
            query += "&x=" + "q" * self.rng.choice((8000, 10_000, 70_000))
        elif label == "long-bearer":
            auth = "Authorization: Bearer " + "k" * self.rng.choice((9000, 60_000))
        elif label == "long-header":
            headers.append("X-Big: " + "b" * self.rng.choice((8200, 9000, 70_000)))
        elif label == "many-headers":
            headers += [f"X-H{i}: v" for i in range(self.rng.choice((101, 150, 1000)))]
        elif label == "bad-key":
            auth = "Authorization: Bearer " + self.rng.choice(("sk-sb-nope", "ek_nope", "", "x"))
        elif label == "no-key":
            auth = ""
        elif label == "bad-subprotocol":
            auth = "Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.ek_" + "z" * 40
        elif label == "tenant-key-subprotocol":
            auth = f"Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.{key}"
        elif label == "hostile-resume":
            session = self.rng.choice(("sess_nope", "*", "../", "s" * 5000))
            last = self.rng.choice(("x", "event_", "-1", "e" * 200))
            query += f"&session_id={session}&last_event_id={last}"
        elif label == "hostile-model":
            query = "model=" + self.rng.choice(("m" * 65, "%00", "../", "gpt%20realtime", ""))
        elif label == "odd-header":
            headers.append("X-Odd: a\x7fb")
        elif label == "not-http":
            return label, self.rng.randbytes(self.rng.randrange(1, 200)) + b"\r\n\r\n"
        elif label == "bad-version":
            headers[4] = "Sec-WebSocket-Version: 7"
        lines = [f"GET /v1/realtime?{query} HTTP/1.1", *headers, *([auth] if auth else [])]
        return label, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")

    def http_request(self, key: str) -> tuple[str, str, str, dict[str, str], bytes]:
        """(label, method, path, headers, body) of a hostile HTTP request."""
        auth = {"Authorization": f"Bearer {key}"}
        r = self.rng.random()
        if r < 0.6:
            body: Any = {"session": self.session()}
            if self.rng.random() < 0.3:
                body["expires_after"] = self.maybe({"anchor": "created_at", "seconds": 60})
            return (
                "client-secret",
                "POST",
                "/v1/realtime/client_secrets",
                auth,
                dump(body).encode(),
            )
        if r < 0.7:
            depth = self.rng.choice((100, 300, 2000))
            return (
                "deep-body",
                "POST",
                "/v1/realtime/client_secrets",
                auth,
                b"[" * depth + b"]" * depth,
            )
        if r < 0.78:
            return ("big-body", "POST", "/v1/realtime/client_secrets", auth, b" " * 300_000 + b"{}")
        if r < 0.86:
            return (
                "garbage-body",
                "POST",
                "/v1/realtime/client_secrets",
                auth,
                self.rng.randbytes(100),
            )
        if r < 0.92:
            return ("no-key", "POST", "/v1/realtime/client_secrets", {}, b"{}")
        path = self.rng.choice(
            ("/readyz", "/healthz", "/metrics", "/nope", "/v1/realtime", "/" + "p" * 5000)
        )
        return ("get", self.rng.choice(("GET", "DELETE", "PUT")), path, auth, b"")


def dump(value: Any) -> str:
    """JSON text of `value`, however deep (the standard library writes deeper
    JSON than orjson, which is the point)."""
    return json.dumps(value, ensure_ascii=False)
