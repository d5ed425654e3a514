"""The broker service: the only part of Switchboard that talks to model providers.

`translate` is the pure core (a `GenerateRequest` in, a Chat Completions payload
out; upstream stream chunks in, `GenerateEvent`s out), `routing` picks the
upstream and model of a call from the tenants configuration (pure as well),
`chat_stream` is the wire of one streamed call (SSE parsing, error mapping,
closing), `clients` keeps one aiohttp session per upstream deployment,
`service` is the grpc.aio servicer of `switchboard.v1.BrokerService` over all
of them, and `__main__` wires them together: `python -m switchboard.broker`.
See docs/broker.md.
"""
