"""The demo page: a browser conversation through the TypeScript SDK (see server.py)."""
