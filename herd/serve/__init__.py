"""`herd serve`: OpenAI- and Ollama-compatible HTTP API and a web chat over the batching engine."""

from herd.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
