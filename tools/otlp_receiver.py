"""A real OTLP/HTTP trace receiver on 127.0.0.1 that keeps the spans it is sent.

The services export traces with the standard OTLP/HTTP exporter; this server
accepts `POST /v1/traces` with an `ExportTraceServiceRequest` protobuf body
(gzip-compressed or not), decodes it with `opentelemetry-proto` and keeps
every span, so tests can check what a collector would see and benchmarks can
export somewhere real. Anything else gets the status a collector would send
(404, 405, 415 for JSON, 400 for a body that does not decode).

    python -m tools.otlp_receiver --port 4318     # prints one line per span

    with OtlpReceiver() as receiver:              # port 0: a free port
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        ...
        spans = receiver.wait_for(lambda spans: ..., timeout_s=10)
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf import text_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

PROTOBUF = "application/x-protobuf"
_KINDS = {
    Span.SPAN_KIND_INTERNAL: "INTERNAL",
    Span.SPAN_KIND_SERVER: "SERVER",
    Span.SPAN_KIND_CLIENT: "CLIENT",
    Span.SPAN_KIND_PRODUCER: "PRODUCER",
    Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
_STATUSES = {
    Status.STATUS_CODE_UNSET: "UNSET",
    Status.STATUS_CODE_OK: "OK",
    Status.STATUS_CODE_ERROR: "ERROR",
}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it; ids are lowercase hex, "" when absent."""

    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status: str
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(repr=False)
    links: tuple[tuple[str, str], ...] = field(repr=False)
    # The span and its resource in protobuf text form: every field, for scans.
    text: str = field(repr=False)


def value(raw: AnyValue) -> Any:
    """The Python value of an OTLP `AnyValue`."""
    kind = raw.WhichOneof("value")
    if kind == "array_value":
        return [value(item) for item in raw.array_value.values]
    if kind == "kvlist_value":
        return attributes(raw.kvlist_value.values)
    return None if kind is None else getattr(raw, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: value(pair.value) for pair in pairs}


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one `ExportTraceServiceRequest`.

    Raises:
        google.protobuf.message.DecodeError: the body is not one.
    """
    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        resource_text = text_format.MessageToString(resource_spans.resource)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        service=str(resource.get("service.name", "")),
                        name=span.name,
                        kind=_KINDS.get(span.kind, "UNSPECIFIED"),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=attributes(span.attributes),
                        status=_STATUSES.get(span.status.code, "UNSET"),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        resource=resource,
                        links=tuple((ln.trace_id.hex(), ln.span_id.hex()) for ln in span.links),
                        text=resource_text + text_format.MessageToString(span),
                    )
                )
    return spans


class OtlpReceiver:
    """An OTLP/HTTP trace receiver serving from a thread; see the module docstring."""

    def __init__(
        self,
        port: int = 0,
        *,
        on_span: Callable[[ReceivedSpan], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.requests = 0
        self._on_span = on_span
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver._post(self)

            def do_GET(self) -> None:
                self._reply(405, b"", "text/plain")

            def _reply(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # no access log on the test output

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The base URL for `OTEL_EXPORTER_OTLP_ENDPOINT`."""
        return f"http://127.0.0.1:{self.port}"

    def _post(self, handler: Any) -> None:
        if handler.path.rstrip("/") != "/v1/traces":
            handler._reply(404, b"", "text/plain")
            return
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        if handler.headers.get("Content-Type", "").split(";")[0].strip() != PROTOBUF:
            handler._reply(415, b"only application/x-protobuf", "text/plain")
            return
        try:
            if handler.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            spans = decode(body)
        except (DecodeError, OSError, EOFError):
            handler._reply(400, b"not an ExportTraceServiceRequest", "text/plain")
            return
        with self._lock:
            self._spans.extend(spans)
            self.requests += 1
        if self._on_span is not None:
            for span in spans:
                self._on_span(span)
        handler._reply(200, ExportTraceServiceResponse().SerializeToString(), PROTOBUF)

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def wait_for(
        self,
        ready: Callable[[list[ReceivedSpan]], bool],
        timeout_s: float = 15.0,
    ) -> list[ReceivedSpan]:
        """Poll until `ready(spans)` holds; returns the spans then.

        Raises:
            TimeoutError: it did not hold within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if ready(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"spans not there after {timeout_s:g}s ({len(spans)} received)")
            time.sleep(0.05)

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the command line's way)."""
        self._server.serve_forever()

    def start(self) -> OtlpReceiver:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _print(span: ReceivedSpan) -> None:
    parent = span.parent_span_id or "-" * 16
    print(
        f"{span.trace_id} {parent} -> {span.span_id} {span.service:<22} {span.kind:<8} "
        f"{span.name} {span.attributes}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    receiver = OtlpReceiver(args.port, on_span=_print)
    print(f"OTLP/HTTP receiver on {receiver.endpoint}/v1/traces", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        receiver.serve_forever()


if __name__ == "__main__":
    main()
