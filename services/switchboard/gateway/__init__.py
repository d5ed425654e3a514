"""The edge service: the OpenAI Realtime WebSocket protocol over Starlette + uvicorn.

`protocol` is the I/O-free state machine of one connection; `connection` is the
thin asyncio pump around it that talks to the backends (`backends`); `app`
wires routes, authentication and resources.
"""
