"""The transformer and its KV cache; knows nothing of files, tokenizers or HTTP."""

from herd.model.kv_cache import KVCache, SlotCache, SlotRows
from herd.model.transformer import Transformer

__all__ = ["KVCache", "SlotCache", "SlotRows", "Transformer"]
