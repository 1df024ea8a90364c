"""OpenAI-compatible HTTP server (``dsv4 serve``).

Only the CLI hook is imported eagerly: FastAPI, uvicorn and prometheus_client (the ``serve``
extra) are needed only when a server is actually built.
"""

from dsv4.server.cli import add_serve_cli

__all__ = ["add_serve_cli"]
