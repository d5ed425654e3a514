"""Switchboard's OpenAI-compatible upstream SIMULATOR (not a model, not the real API).

A real HTTP server that answers ``/v1/chat/completions`` (streaming and not) with a
deterministic reply derived from the request, with configurable time to first token,
inter-token delay, tool calls, injected HTTP errors and mid-stream disconnects. It is
the default upstream when no OpenAI key is set, and the upstream of every test and
benchmark. See docs/simulator.md for the full contract.

Public API:
    SimulatorConfig: start-up settings (frozen dataclass).
    create_app: build the aiohttp application.
    run_simulator: async context manager serving it in the current event loop.
"""

from tools.simulator.server import RunningSimulator, SimulatorConfig, create_app, run_simulator

__all__ = ["RunningSimulator", "SimulatorConfig", "create_app", "run_simulator"]
