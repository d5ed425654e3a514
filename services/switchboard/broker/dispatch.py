"""One model call's way to its deployments: attempts, admission, breakers, the stream.

`Dispatcher.run` runs one call: it hands each event (`events.Event`) to the
caller's `publish` as it comes, and returns `Finished`. It tries the call's
deployments in `routing.order`; each attempt holds a slot of its upstream's
admission control (`admission`), passes its circuit breaker (`breaker`), and
streams the upstream's chunks through a fresh `ChunkTranslator`. The call is
*committed* when the first delta (or the finish) is about to go out: then
`Started` names the deployment, and from then on a failure ends the call,
since the client may have shown the text. Before that, a failure another
attempt might not meet is retried or failed over as `retry.Attempts` decides.
Every failure leaves as a `SwitchboardError`.

The events are pushed, not yielded: a token's way from the upstream read to
the call's follower is one loop in one coroutine (`_Attempt.run`), with no
generator layer to step per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from switchboard.broker.admission import Admission, Lease
from switchboard.broker.breaker import Breakers, CircuitBreaker
from switchboard.broker.chat_stream import ChatStream
from switchboard.broker.clients import UpstreamClients
from switchboard.broker.events import Event
from switchboard.broker.metrics import BrokerMetrics
from switchboard.broker.retry import BREAKER_REASONS, Attempts, RetryPolicy, retry_reason
from switchboard.broker.routing import Candidate, Target, order
from switchboard.broker.translate import ChunkTranslator, chat_request
from switchboard.errors import SwitchboardError, UpstreamError
from switchboard.v1 import broker_pb2, common_pb2

log = logging.getLogger(__name__)

Publish = Callable[[Event], Awaitable[None]]


@dataclass
class Progress:
    """What is known of a call so far, for its log line and metrics.

    Attributes:
        started: when the call reached the broker (monotonic).
        upstream: the upstream of the latest attempt ("" before the first).
        upstream_model: the model sent to it.
        request_id: the upstream's request id of the latest attempt.
        first_event: when the first delta went out, once committed.
        attempts: attempts made.
        translator: the latest attempt's translator (its usage so far).
    """

    started: float
    translator: ChunkTranslator
    upstream: str = ""
    upstream_model: str = ""
    request_id: str | None = None
    first_event: float | None = None
    attempts: int = 0


class Dispatcher:
    """Sends calls to their deployments; shared by every call of the servicer."""

    def __init__(
        self,
        clients: UpstreamClients,
        admission: Admission,
        breakers: Breakers,
        policy: RetryPolicy,
        metrics: BrokerMetrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.clients = clients
        self.admission = admission
        self.breakers = breakers
        self.policy = policy
        self._metrics = metrics
        self.clock = clock
        self._draw = draw
        self._sleep = sleep

    async def run(
        self,
        request: broker_pb2.GenerateRequest,
        target: Target,
        progress: Progress,
        publish: Publish,
    ) -> broker_pb2.GenerateEvent:
        """Run one call: `publish` `Started` and the deltas; return `Finished`.

        Cancelling the task that runs it releases the attempt's admission slot
        and closes its upstream stream at once.

        Args:
            request: the call.
            target: its deployments (`routing.resolve`).
            progress: filled in as the call goes, for the caller's log line.
            publish: awaited with each event in order, once the call is
                committed (`Started` first); it may wait (backpressure).

        Returns:
            The `Finished` event, not published: the caller's to send.

        Raises:
            SwitchboardError: the call failed (after retries, when it could).
        """
        candidates = {c.upstream.name: c for c in order(target.candidates, self._draw)}
        # Built first: a request the upstream could never take fails before any attempt.
        payloads = {name: chat_request(request, c.model) for name, c in candidates.items()}
        plan = Attempts(self.policy, list(candidates), started=progress.started, draw=self._draw)

        def available(name: str) -> bool:
            return self._breaker(candidates[name]).available(self.clock())

        failure: tuple[str, str, SwitchboardError] | None = None
        while True:
            step = plan.next(self.clock(), available)
            if step is None:
                raise plan.last_error or self._unavailable(target, candidates)
            if failure is not None:
                self._retrying(request, *failure, step.upstream, step.delay)
                failure = None
            if step.delay:
                await self._sleep(step.delay)
            candidate = candidates[step.upstream]
            breaker = self._breaker(candidate)
            if not breaker.allow(self.clock()):
                plan.blocked(step.upstream)  # another call took the half-open probe
                continue
            plan.begin(step)
            progress.attempts = plan.made
            attempt = self._attempt(request, candidate, breaker, payloads[step.upstream], progress)
            try:
                return await attempt.run(publish)
            except SwitchboardError as error:
                reason = retry_reason(error)
                if attempt.committed or reason is None:
                    raise
                plan.failed(step.upstream, error, reason)
                failure = (step.upstream, reason, error)

    def _attempt(
        self,
        request: broker_pb2.GenerateRequest,
        candidate: Candidate,
        breaker: CircuitBreaker,
        payload: dict[str, Any],
        progress: Progress,
    ) -> _Attempt:
        progress.upstream, progress.upstream_model = candidate.upstream.name, candidate.model
        progress.request_id = None
        progress.translator = ChunkTranslator(
            estimated_input_tokens=request.context.estimated_tokens,
            call_id_prefix=f"call_{request.response_id}_" if request.response_id else "call_",
        )
        return _Attempt(self, request, candidate, breaker, payload, progress)

    def _breaker(self, candidate: Candidate) -> CircuitBreaker:
        return self.breakers.get(candidate.upstream)

    def _retrying(
        self,
        request: broker_pb2.GenerateRequest,
        upstream: str,
        reason: str,
        error: SwitchboardError,
        next_upstream: str,
        delay: float,
    ) -> None:
        self._metrics.upstream_retries.labels(upstream, reason).inc()
        log.info(
            "upstream attempt failed, trying again",
            extra={
                "tenant_id": request.tenant_id,
                "session_id": request.session_id,
                "response_id": request.response_id,
                "upstream": upstream,
                "reason": reason,
                "code": error.name,
                "next_upstream": next_upstream,
                "delay_ms": round(delay * 1000),
            },
        )

    def _unavailable(self, target: Target, candidates: dict[str, Candidate]) -> SwitchboardError:
        now = self.clock()
        wait = min(self._breaker(c).reopens_in(now) for c in candidates.values())
        seconds = max(math.ceil(wait), 1)
        return UpstreamError(
            f"Every deployment of the model '{target.route.name[:128]}' is failing and its "
            f"circuit breaker is open; retry after {seconds} s.",
            retry_after=float(seconds),
        )


class _Attempt:
    """One attempt of a call on one deployment; reports to its breaker exactly once."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        request: broker_pb2.GenerateRequest,
        candidate: Candidate,
        breaker: CircuitBreaker,
        payload: dict[str, Any],
        progress: Progress,
    ) -> None:
        self._dispatcher = dispatcher
        self._request = request
        self._candidate = candidate
        self._breaker = breaker
        self._payload = payload
        self._progress = progress
        self.committed = False
        self._judged = False
        self._lease: Lease | None = None
        self._stream: ChatStream | None = None

    async def run(self, publish: Publish) -> broker_pb2.GenerateEvent:
        dispatcher, candidate, progress = self._dispatcher, self._candidate, self._progress
        feed = progress.translator.feed
        try:
            async with dispatcher.admission.slot(
                candidate.upstream, self._request.tenant_id
            ) as self._lease:
                client = dispatcher.clients.client(candidate.upstream)
                async with client.stream(self._payload) as self._stream:
                    stream = self._stream
                    progress.request_id = stream.request_id
                    while (chunks := await stream.read()) is not None:
                        for chunk in chunks:
                            events = feed(chunk)
                            if events and not self.committed:
                                await publish(self._commit(client.description))
                            for event in events:
                                await publish(event)
                finished = progress.translator.finish()
                if not self.committed:  # a reply with no delta at all
                    await publish(self._commit(client.description))
                return finished
        except SwitchboardError as error:
            if retry_reason(error) in BREAKER_REASONS:
                # After the commit too: a deployment that breaks its streams is failing.
                self._breaker.failed(dispatcher.clock())
                self._judged = True
            elif not self._judged and error.code != common_pb2.ERROR_CODE_SERVER_BUSY:
                # The upstream answered (a 4xx, say): it is up, if unhappy with the call.
                self._breaker.succeeded()
                self._judged = True
            raise
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Let go of everything the attempt holds, from synchronous code; idempotent.

        Runs when the attempt ends, however it ends (done, failed, or its task
        cancelled). A breaker given no verdict (cancelled, refused by
        admission control) frees a half-open probe's place for the next call.
        """
        if self._stream is not None:
            self._stream.close_soon()
        if self._lease is not None:
            self._lease.release()
        if not self._judged:
            self._judged = True
            self._breaker.abandoned()

    def _commit(self, description: str) -> broker_pb2.GenerateEvent:
        self.committed = True
        self._progress.first_event = self._dispatcher.clock()
        self._breaker.succeeded()
        self._judged = True
        return broker_pb2.GenerateEvent(
            started=broker_pb2.Started(upstream=description, upstream_model=self._candidate.model)
        )
