"""Writing GGUF files that llama.cpp loads: llama metadata, tensors under llama.cpp's names
(already in the interleaved rotary layout GGUF uses), quantized with gguf-py's implementation of
llama.cpp's reference rules, and the vocabulary (copied from a GGUF source, or built by gguf-py from
a SentencePiece tokenizer.model or a byte-level BPE tokenizer.json).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quantize
from gguf.vocab import BpeVocab, SentencePieceVocab, SpecialVocab
from tqdm import tqdm

from herd.checkpoint.gguf_file import gguf_names
from herd.config import ModelConfig
from herd.errors import HerdError
from herd.model.transformer import rope_frequencies

T = GGMLQuantizationType
# --type -> (matrix type, llama.cpp's file type)
TYPES = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}


def tokenizer_metadata(source: Path, gguf_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """GGUF `tokenizer.*` metadata for the tokenizer at `source`: a GGUF's own (pass its metadata),
    a SentencePiece tokenizer.model (file, or a directory holding one) or a directory with a
    byte-level BPE tokenizer.json. Empty when there is none herd can describe."""
    if gguf_metadata is not None:
        return {k: v for k, v in gguf_metadata.items() if k.startswith("tokenizer.")}
    directory = source if source.is_dir() else source.parent
    with tempfile.TemporaryDirectory() as tmp:
        if source.is_file():  # gguf-py looks for the name tokenizer.model
            (Path(tmp) / "tokenizer.model").symlink_to(source.resolve())
            directory = Path(tmp)
        md: dict[str, Any] = {}
        if (directory / "tokenizer.json").is_file():
            try:
                vocab = BpeVocab(directory)
            except (FileNotFoundError, ValueError, KeyError):
                vocab = None
        else:
            vocab = None
        if vocab is None and (directory / "tokenizer.model").is_file():
            vocab = SentencePieceVocab(directory)
        if vocab is None:
            return {}
        tokens, scores, types = zip(*vocab.all_tokens())
        md["tokenizer.ggml.model"] = vocab.tokenizer_model
        if vocab.tokenizer_model == "gpt2":
            md["tokenizer.ggml.pre"] = "default"
        md["tokenizer.ggml.tokens"] = [t.decode("utf-8", errors="replace") for t in tokens]
        md["tokenizer.ggml.scores"] = [float(s) for s in scores]
        md["tokenizer.ggml.token_type"] = [int(t) for t in types]
        special = SpecialVocab(directory, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        if special.merges:
            md["tokenizer.ggml.merges"] = list(special.merges)
        for kind, token_id in special.special_token_ids.items():
            md[f"tokenizer.ggml.{kind}_token_id"] = token_id
        for kind, value in special.add_special_token.items():
            md[f"tokenizer.ggml.add_{kind}_token"] = value
        if vocab.tokenizer_model == "llama" and not special.special_token_ids:
            sp = vocab.sentencepiece_tokenizer
            for kind, token_id in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id())):
                if token_id >= 0:
                    md[f"tokenizer.ggml.{kind}_token_id"] = token_id
        if special.chat_template:
            md["tokenizer.chat_template"] = special.chat_template
    return md


def _add_value(w: GGUFWriter, key: str, value: Any) -> None:
    """One metadata value with the type llama.cpp expects of it."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, list):
        sub = (GGUFValueType.STRING if all(isinstance(v, str) for v in value) else
               GGUFValueType.FLOAT32 if any(isinstance(v, float) for v in value) else GGUFValueType.INT32)
        w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=sub)
    else:
        raise HerdError(f"cannot write metadata {key} of type {type(value).__name__} to GGUF")


def save_gguf(config: ModelConfig, state_dict: dict[str, torch.Tensor], path: str | Path, type: str = "f16", *,
              tokenizer: dict[str, Any] | None = None, progress: bool = False) -> Path:
    """Write a llama GGUF file: norms in F32, every matrix in `type` (f32, f16, bf16, q8_0, q4_0,
    q4_1) except that 4-bit files keep the embedding and output at Q8_0; `tokenizer` is
    `tokenizer.*` metadata (see tokenizer_metadata). A quantized matrix whose width is not a
    multiple of 32 stays F32."""
    if type not in TYPES:
        raise HerdError(f"unknown GGUF type {type!r}; use one of {', '.join(TYPES)}")
    qtype, file_type = TYPES[type]
    path = Path(path)
    cfg = config
    w = GGUFWriter(path, "llama")
    w.add_name(cfg.name or path.stem)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    if cfg.rope_scaling is not None:
        w.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.original_max_position)
    for key, value in (tokenizer or {}).items():
        _add_value(w, key, value)

    ours = {herd: g for g, herd in gguf_names(cfg.n_layers).items()}
    tensors = dict(state_dict)
    if cfg.tie_embeddings:
        tensors.pop("output.weight", None)  # llama.cpp reuses token_embd when output is absent
    if cfg.rope_scaling is not None:  # Llama 3.1 scaling travels as per-frequency divisors
        factors = rope_frequencies(cfg.head_dim, cfg.rope_theta, None) / \
            rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        w.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32))
    for name, t in tqdm(tensors.items(), desc="writing GGUF", unit="tensor", disable=not progress):
        if name not in ours:
            raise HerdError(f"tensor {name} has no GGUF name")
        data = t.detach().float().numpy()
        kind = qtype if data.ndim == 2 else T.F32
        if kind in (T.Q4_0, T.Q4_1) and name in ("output.weight", "tok_embeddings.weight"):
            kind = T.Q8_0  # as herd.quant.quantize keeps them (and llama.cpp keeps output at Q6_K)
        if kind not in (T.F32, T.F16, T.BF16) and data.shape[1] % 32:
            kind = T.F32
        if kind == T.F32:
            w.add_tensor(ours[name], data)
        elif kind == T.F16:
            w.add_tensor(ours[name], data.astype(np.float16))
        else:
            w.add_tensor(ours[name], quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return path
