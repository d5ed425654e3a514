"""Fixtures shared by the gateway tests: the whole app in-process (test_app.py)."""

from tests.gateway.test_app import gateway  # noqa: F401
