"""The OpenAI-compatible HTTP server (rank 0): ``create_app(engine, ServerConfig(...))``."""

from epserve.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
