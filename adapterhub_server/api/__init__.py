"""The OpenAI-compatible HTTP API: `create_app(engine)` builds it."""

from adapterhub_server.api.app import create_app

__all__ = ["create_app"]
