"""The session service: the owner of conversation state in Redis.

`store` is the Redis data access (sessions, items, event logs; key layout in
docs/session.md), `context` the pure context-window builder, `service` the
grpc.aio servicer over both, and `__main__` wires them together:
`python -m switchboard.session`.
"""
