"""The OpenAI-compatible HTTP API (FastAPI): `create_app(settings, service=None)`."""

from server.http.app import create_app

__all__ = ["create_app"]
