"""Model shapes: the `ModelConfig` dataclass and a registry of the published Llama variants.

A config says everything the transformer needs to allocate itself; nothing about files,
tokenizers or devices. Named configs carry the shapes of the released checkpoints so a model can
be built with random weights (benchmarks, tests) or checked against a file being loaded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType

from herd.errors import HerdError

# Bounds on the sizes a config may give: far above every released model (Llama 3.1 405B: 126
# layers, width 16384, feed-forward 53248; Llama 4: a 202048-token vocabulary, 128 experts, a
# 10M-token context), far below what a lying file could make herd allocate.
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 20
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 31
MAX_EXPERTS = 1 << 12


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 rotary frequency scaling: long wavelengths are slowed by `factor`, short ones
    kept, and the band between them interpolated smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class MoE:
    """Llama 4's mixture of experts: a sigmoid router sends each token to its `top_k` experts
    (scaling the token by its score on the way in), and a shared expert of the same width sees
    every token. Every `layer_step`-th layer has one (1: all layers; Maverick: 2); the others
    keep a dense feed-forward of `ModelConfig.hidden_dim`."""

    n_experts: int
    hidden_dim: int  # width of each expert and of the shared expert
    top_k: int = 1
    layer_step: int = 1


@dataclass(frozen=True)
class AttnTemperature:
    """Llama 4's attention temperature tuning on the layers without rotary embeddings: queries
    are scaled by 1 + attn_scale * log(1 + floor((position + 1) / floor_scale)), so attention
    stays sharp over long contexts."""

    floor_scale: float = 8192.0
    attn_scale: float = 0.1


def _integer_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number_in(value: object, low: float, high: float) -> bool:
    """A finite int or float strictly between low and high."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and low < value < high


def _scaling_problems(s: RopeScaling | None, label: Callable[[str], str]) -> list[str]:
    if s is None or (all(_number_in(v, 0, math.inf) for v in (s.factor, s.low_freq_factor, s.high_freq_factor))
                     and _integer_in(s.original_max_position, 1, MAX_CONTEXT)):
        return []
    return [f"{label('rope_scaling')} needs positive finite factors and original_max_position, got {s}"]


class ConfigError(HerdError):
    """An invalid ModelConfig; it keeps the config so that a loader can name each wrong field by
    its file's key (`config.problems(names)`)."""

    def __init__(self, config: ModelConfig):
        self.config = config
        name = f" {config.name}" if config.name else ""
        super().__init__(f"invalid model config{name}: " + "; ".join(config.problems()))


_SIZE_LIMITS = {"dim": MAX_WIDTH, "n_layers": MAX_LAYERS, "n_heads": MAX_WIDTH, "vocab_size": MAX_VOCAB,
                "hidden_dim": MAX_WIDTH, "n_kv_heads": MAX_WIDTH, "max_seq_len": MAX_CONTEXT}


@dataclass
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hidden_dim: int  # width of the SwiGLU feed-forward
    n_kv_heads: int | None = None  # None: as many as n_heads (multi-head attention)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    name: str = ""
    family: str = ""  # "llama2", "llama3", "codellama", ... : picks tokenizer/chat defaults
    # Llama 4 (all off for Llama 1-3):
    moe: MoE | None = None
    nope_layer_step: int = 0  # every n-th layer (n, 2n, ...) has no rotary embedding; 0: none
    attention_chunk_size: int | None = None  # rotary layers attend only within chunks of this many positions
    qk_norm: bool = False  # L2-normalise queries and keys (after rotary) on rotary layers
    attn_temperature: AttnTemperature | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        try:
            if isinstance(self.rope_scaling, dict):
                self.rope_scaling = RopeScaling(**self.rope_scaling)
            if isinstance(self.moe, dict):
                self.moe = MoE(**self.moe)
            if isinstance(self.attn_temperature, dict):
                self.attn_temperature = AttnTemperature(**self.attn_temperature)
        except TypeError as e:
            raise HerdError(f"invalid model config: {e}") from None
        if self.problems():
            raise ConfigError(self)

    def problems(self, names: Mapping[str, str] = MappingProxyType({})) -> list[str]:
        """What is wrong with this config, each field called by `names` (a file's own keys) when
        it maps the field; empty when nothing is."""
        def label(field: str) -> str:
            return names.get(field, field)

        found = [f"{label(f)} must be a positive integer up to {limit}, got {getattr(self, f)!r}"
                 for f, limit in _SIZE_LIMITS.items() if not _integer_in(getattr(self, f), 1, limit)]
        if not found:
            if self.dim % self.n_heads:
                found.append(f"{label('dim')} {self.dim} is not divisible by {label('n_heads')} {self.n_heads}")
            elif self.n_heads % self.n_kv_heads:
                found.append(f"{label('n_heads')} {self.n_heads} is not a multiple of "
                             f"{label('n_kv_heads')} {self.n_kv_heads}")
            elif self.head_dim % 2:
                found.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not _number_in(self.norm_eps, 0, 1):
            found.append(f"{label('norm_eps')} must be a number between 0 and 1, got {self.norm_eps!r}")
        if not _number_in(self.rope_theta, 0, math.inf):
            found.append(f"{label('rope_theta')} must be a positive number, got {self.rope_theta!r}")
        return found + self._llama4_problems(label) + _scaling_problems(self.rope_scaling, label)

    def _llama4_problems(self, label: Callable[[str], str]) -> list[str]:
        found = []
        m = self.moe
        if m is not None and not (_integer_in(m.n_experts, 1, MAX_EXPERTS) and _integer_in(m.top_k, 1, m.n_experts)
                                  and _integer_in(m.hidden_dim, 1, MAX_WIDTH)
                                  and _integer_in(m.layer_step, 1, MAX_LAYERS)):
            found.append(f"moe needs 1 <= top_k <= n_experts <= {MAX_EXPERTS}, hidden_dim from 1 to {MAX_WIDTH} "
                         f"and a positive layer_step, got {m}")
        if not _integer_in(self.nope_layer_step, 0, MAX_LAYERS):
            found.append(f"{label('nope_layer_step')} must be an integer >= 0, got {self.nope_layer_step!r}")
        if self.attention_chunk_size is not None and not _integer_in(self.attention_chunk_size, 1, MAX_CONTEXT):
            found.append(f"{label('attention_chunk_size')} must be a positive integer, "
                         f"got {self.attention_chunk_size!r}")
        t = self.attn_temperature
        if t is not None and not (_number_in(t.floor_scale, 0, math.inf)
                                  and _number_in(t.attn_scale, -math.inf, math.inf)):
            found.append(f"attention temperature needs a positive floor_scale and a finite attn_scale, got {t}")
        return found

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and (layer + 1) % self.moe.layer_step == 0

    def uses_rope(self, layer: int) -> bool:
        return not self.nope_layer_step or (layer + 1) % self.nope_layer_step != 0

    def num_params(self, active: bool = False) -> int:
        """Parameter count; active=True counts only the experts one token goes through."""
        d, hd = self.dim, self.head_dim
        attention = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        total = 0
        for i in range(self.n_layers):
            if self.is_moe_layer(i):
                m = self.moe
                experts = m.top_k if active else m.n_experts
                ffn = 3 * d * m.hidden_dim * (experts + 1) + d * m.n_experts  # experts, shared expert, router
            else:
                ffn = 3 * d * self.hidden_dim
            total += attention + ffn + 2 * d
        embed = self.vocab_size * d
        return total + embed + d + (0 if self.tie_embeddings else embed)

    def kv_cache_bytes(self, seq_len: int, bytes_per_value: int) -> int:
        """Memory of the KV cache for one sequence of `seq_len` tokens."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * seq_len * bytes_per_value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _llama3_rope(factor: float) -> RopeScaling:
    return RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)


def _llama4(n_experts: int, layer_step: int, **kw) -> ModelConfig:
    """Llama 4 Scout/Maverick text models: 17B active parameters, one routed expert per token,
    rotary on three layers in four (chunked local attention, 8192 positions) and global NoPE
    attention on every fourth."""
    return ModelConfig(dim=5120, n_layers=48, n_heads=40, vocab_size=202048, hidden_dim=16384, n_kv_heads=8,
                       rope_theta=5e5, moe=MoE(n_experts=n_experts, hidden_dim=8192, layer_step=layer_step),
                       nope_layer_step=4, attention_chunk_size=8192, attn_temperature=AttnTemperature(),
                       family="llama4", **kw)


def _registry() -> dict[str, ModelConfig]:
    # What a family shares is said once; each line below gives the rest by name.
    llama2 = partial(ModelConfig, vocab_size=32000, family="llama2")
    codellama = partial(ModelConfig, rope_theta=1e6, max_seq_len=16384, family="codellama")
    llama3 = partial(ModelConfig, vocab_size=128256, n_kv_heads=8, rope_theta=5e5, family="llama3")
    llama31 = partial(llama3, rope_scaling=_llama3_rope(8.0), max_seq_len=131072)
    llama32 = partial(llama3, rope_scaling=_llama3_rope(32.0), tie_embeddings=True, max_seq_len=131072)
    smollm2 = partial(ModelConfig, vocab_size=49152, tie_embeddings=True, max_seq_len=8192, family="chatml")
    stories = partial(llama2, tie_embeddings=True)
    configs = [
        # Llama 1 (Touvron et al. 2023), 2048 context
        llama2(name="llama-7b", dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, norm_eps=1e-6),
        llama2(name="llama-13b", dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, norm_eps=1e-6),
        llama2(name="llama-33b", dim=6656, n_layers=60, n_heads=52, hidden_dim=17920, norm_eps=1e-6),
        llama2(name="llama-65b", dim=8192, n_layers=80, n_heads=64, hidden_dim=22016, norm_eps=1e-5),
        # Llama 2, 4096 context; 70B uses grouped-query attention
        llama2(name="llama-2-7b", dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096),
        llama2(name="llama-2-13b", dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=4096),
        llama2(name="llama-2-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
               max_seq_len=4096),
        # Code Llama: rope theta 1e6, 16K training context; 7B/13B add 16 infill tokens
        codellama(name="codellama-7b", dim=4096, n_layers=32, n_heads=32, vocab_size=32016, hidden_dim=11008),
        codellama(name="codellama-13b", dim=5120, n_layers=40, n_heads=40, vocab_size=32016, hidden_dim=13824),
        codellama(name="codellama-34b", dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000,
                  hidden_dim=22016),
        # Llama 3: 128K vocabulary, GQA everywhere, rope theta 500000
        llama3(name="llama-3-8b", dim=4096, n_layers=32, n_heads=32, hidden_dim=14336, max_seq_len=8192),
        llama3(name="llama-3-70b", dim=8192, n_layers=80, n_heads=64, hidden_dim=28672, max_seq_len=8192),
        # Llama 3.1: 128K context through scaled rope
        llama31(name="llama-3.1-8b", dim=4096, n_layers=32, n_heads=32, hidden_dim=14336),
        llama31(name="llama-3.1-70b", dim=8192, n_layers=80, n_heads=64, hidden_dim=28672),
        llama31(name="llama-3.1-405b", dim=16384, n_layers=126, n_heads=128, hidden_dim=53248),
        # Llama 3.2: small models with tied embeddings, rope factor 32
        llama32(name="llama-3.2-1b", dim=2048, n_layers=16, n_heads=32, hidden_dim=8192),
        llama32(name="llama-3.2-3b", dim=3072, n_layers=28, n_heads=24, hidden_dim=8192),
        llama31(name="llama-3.3-70b", dim=8192, n_layers=80, n_heads=64, hidden_dim=28672),
        # Llama 4: mixture of experts. Scout: 16 experts in every layer, QK norm, 10M context by
        # scaled rope; Maverick: 128 experts in every other layer, 1M context.
        _llama4(n_experts=16, layer_step=1, qk_norm=True, max_seq_len=10485760, name="llama-4-scout-17b-16e",
                rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                         original_max_position=8192)),
        _llama4(n_experts=128, layer_step=2, max_seq_len=1048576, name="llama-4-maverick-17b-128e"),
        # Community models with the Llama architecture
        llama2(name="tinyllama-1.1b", dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
               max_seq_len=2048),
        smollm2(name="smollm2-135m", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, rope_theta=1e5),
        smollm2(name="smollm2-360m", dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, rope_theta=1e5),
        smollm2(name="smollm2-1.7b", dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192,
                rope_theta=1.3e5),
        # Karpathy's llama2.c TinyStories models (shared classifier)
        stories(name="stories260k", dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, hidden_dim=172,
                max_seq_len=512),
        stories(name="stories15m", dim=288, n_layers=6, n_heads=6, hidden_dim=768, max_seq_len=256),
        stories(name="stories42m", dim=512, n_layers=8, n_heads=8, hidden_dim=1376, max_seq_len=1024),
        stories(name="stories110m", dim=768, n_layers=12, n_heads=12, hidden_dim=2048, max_seq_len=1024),
    ]
    return {cfg.name: cfg for cfg in configs}


CONFIGS: dict[str, ModelConfig] = _registry()


def get_config(name: str) -> ModelConfig:
    """The registered config `name` (case-insensitive), as a fresh copy."""
    cfg = CONFIGS.get(name.lower())
    if cfg is None:
        raise HerdError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}")
    return cfg.replace()
