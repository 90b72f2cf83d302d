"""`herd serve`: OpenAI- and Ollama-compatible HTTP API and a web chat over the batching engine."""

from herd.serve.app import api_key_from, create_app, listen, serve

__all__ = ["api_key_from", "create_app", "listen", "serve"]
