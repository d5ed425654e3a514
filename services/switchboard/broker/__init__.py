"""The broker service: the only part of Switchboard that talks to model providers.

`translate` is the pure core (a `GenerateRequest` in, a Chat Completions payload
out; upstream stream chunks in, `GenerateEvent`s out), `upstream` wraps the
`openai` SDK client (streaming, SSE parsing, error mapping, closing), `service`
is the grpc.aio servicer of `switchboard.v1.BrokerService` over both, and
`__main__` wires them together: `python -m switchboard.broker`. See docs/broker.md.
"""
