"""Continuous batching over a herd.LLM: a request queue, a scheduler that interleaves prefill and
decode, a per-slot KV cache with prompt-prefix reuse, cancellation and metrics."""

from herd.engine.engine import Engine, EngineStopped, Event, Handle, QueueFull, Request, TokenLogprob

__all__ = ["Engine", "EngineStopped", "Event", "Handle", "QueueFull", "Request", "TokenLogprob"]
