"""The Llama decoder-only transformer: RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU feed-forward. One module covers Llama 1/2/3/3.x/4, Code Llama and the Llama-shaped
community models; the differences live in `ModelConfig`. Llama 4 adds, per layer: a
mixture-of-experts feed-forward (moe.py), no rotary embedding on every fourth layer (with
attention temperature tuning there), chunked local attention and QK L2 norm on the others.

Parameter names follow Meta's reference code (`tok_embeddings`, `layers.N.attention.wq`, ...),
and rotary embeddings rotate interleaved pairs as Meta's, llama2.c and GGUF files do; the
checkpoint package converts other layouts on load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import ModelConfig, RopeScaling
from herd.model.kv_cache import KVCache
from herd.model.loss import cross_entropy_sum
from herd.model.moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as the reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3.1 scaling when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] by the angles in cos/sin [B, T, 1, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight (Llama 4's QK norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.rope = cfg.uses_rope(layer_id)
        self.chunked = self.rope and cfg.attention_chunk_size is not None  # NoPE layers attend globally
        self.qk_norm_eps = cfg.norm_eps if cfg.qk_norm and self.rope else None
        self.temperature = None if self.rope else cfg.attn_temperature

    def forward(self, x, cos, sin, cache: KVCache | None, input_pos, mask) -> torch.Tensor:
        """mask: None for plain causal attention without a cache, else [B, 1, T, keys] (True: attend)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_norm_eps is not None:
            q, k = l2_norm(q, self.qk_norm_eps), l2_norm(k, self.qk_norm_eps)
        if self.temperature is not None:
            t = self.temperature
            scale = torch.log1p(torch.floor((input_pos.float() + 1) / t.floor_scale)) * t.attn_scale + 1
            q = (q * scale[..., None, None]).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = self.n_kv_heads != self.n_heads
        if cache is not None:
            out = cache.attend(self.layer_id, input_pos, q, k, v, mask)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.is_moe_layer(layer_id):
            self.feed_forward = MoE(cfg.dim, cfg.moe, shared_expert=FeedForward(cfg.dim, cfg.moe.hidden_dim))
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)

    def forward(self, x, cos, sin, cache, input_pos, mask) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Loaders build on the meta device and then assign the weights: there the embedding is left
        # uninitialised, since normal_ on meta first imports torch's Python reference kernels (sympy,
        # dynamo), seconds of every model load.
        blank = torch.empty(cfg.vocab_size, cfg.dim) if torch.get_default_device().type == "meta" else None
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=blank)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Created on the CPU explicitly so that a model built on the meta device still has it.
        inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # Optional native replacement of forward for small steps with a cache (herd.quant.forward);
        # it returns None when it cannot take a call.
        self.fast_forward = None

    @property
    def device(self) -> torch.device:
        """Where the model computes (that of its final norm: packed weights may keep a copy elsewhere)."""
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: the final norm's, since embeddings and linears may be packed."""
        return self.norm.weight.dtype

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None,
                  kind: type[KVCache] = KVCache) -> KVCache:
        """A zeroed KV cache (a KVCache, or the engine's SlotCache) for `batch_size` sequences of up
        to `max_seq_len` tokens."""
        cfg = self.config
        return kind(cfg.n_layers, batch_size, cfg.n_kv_heads, max_seq_len or cfg.max_seq_len, cfg.head_dim,
                    dtype=dtype or self.dtype, device=self.device)

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        static: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for tokens [B, T].

        input_pos: position of each token, [T] or [B, T] (default 0..T-1). With a cache, each
            token's key/value is stored at its position and it attends to every cached position
            up to its own, so rows of a batch may sit at different positions (padding is never
            attended). Without a cache, attention is plainly causal.
        logits_at: [B] index of the one position per row whose logits are wanted (prefill);
            the result is then [B, 1, vocab].
        doc_ids: [B, T] document of each token, for training on packed sequences without a
            cache: a token attends only to earlier tokens of its own document (give input_pos
            restarting at 0 for each document).
        targets: [B, T] next token of each position, for training: the result is then the summed
            cross-entropy over the targets that are not -100 (herd.model.loss; no [B, T, vocab]
            logits are kept).
        static: attend over the whole cache under a mask, so that shapes never depend on the
            positions and nothing is read back to the host (a step a CUDA graph can capture);
            the caller keeps positions within the cache.
        """
        if cache is not None and self.fast_forward is not None and not static:
            logits = self.fast_forward(self, tokens, input_pos, cache, logits_at)
            if logits is not None:
                return logits
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        input_pos = input_pos.expand(B, T)
        angles = input_pos.unsqueeze(-1).float() * self.inv_freq  # [B, T, D/2]
        cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)
        mask, local_mask = self.masks(input_pos, cache, doc_ids, static)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, input_pos, local_mask if layer.attention.chunked else mask)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at].unsqueeze(1)
        if targets is not None:
            return cross_entropy_sum(self.norm(x), self.output, targets)
        return self.output(self.norm(x))

    def masks(self, input_pos: torch.Tensor, cache: KVCache | None, doc_ids: torch.Tensor | None,
              static: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mask, local mask) [B, 1, T, keys] for queries at input_pos [B, T] (True: attend). The
        mask is None for plain causal attention without a cache; the local mask (Llama 4's chunked
        layers) is None when the config has no chunks. With a cache the keys are its first
        max position + 1 slots, or all of them when `static`."""
        T = input_pos.shape[1]
        device = input_pos.device
        mask = local_mask = None
        key_pos = input_pos.unsqueeze(1)  # without a cache the keys are the tokens themselves
        if cache is not None:
            kv_len = cache.max_seq_len if static else int(input_pos.max()) + 1
            if kv_len > cache.max_seq_len:
                raise ValueError(f"position {kv_len - 1} is beyond the KV cache length {cache.max_seq_len}")
            key_pos = torch.arange(kv_len, device=device)
            mask = (key_pos <= input_pos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, kv_len]
        elif doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            mask = ((doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)) & causal).unsqueeze(1)  # [B, 1, T, T]
        chunk = self.config.attention_chunk_size
        if chunk is not None:  # causal within chunks of `chunk` positions
            query_pos = input_pos.unsqueeze(-1)
            local_mask = ((key_pos <= query_pos) & (key_pos // chunk == query_pos // chunk)).unsqueeze(1)
            if mask is not None and cache is None:  # packed documents: and within the document
                local_mask = local_mask & mask
        return mask, local_mask
