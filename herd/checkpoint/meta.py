"""Meta's checkpoints: params.json plus consolidated.NN.pth, one file per model-parallel rank.

Tensor names are herd's own. A model-parallel rank holds a slice of each column-parallel matrix
(wq, wk, wv, w1, w3, output: split along output rows), of each row-parallel matrix (wo, w2:
split along input columns) and of the embedding (Llama 3's VocabParallelEmbedding splits rows,
Llama 2's ParallelEmbedding splits columns); norms are replicated on every rank.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from herd.checkpoint.base import (Checkpoint, check_fits, check_state_dict, check_writable, directory_extras,
                                  expected_shapes, make_config, read_json, registered_match, tie_if_equal)
from herd.config import MAX_WIDTH, ModelConfig, RopeScaling
from herd.errors import HerdError

_SPLIT_DIM = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1, "output.weight": 0,
}


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width Meta's FeedForward derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_params(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's formula give `hidden_dim` back: the largest
    power-of-two multiple_of that does it alone, else a multiplier with multiple_of = hidden_dim."""
    for multiple_of in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_hidden_dim(dim, multiple_of, None) == hidden_dim:
            return multiple_of, None
    return hidden_dim, hidden_dim / int(2 * (4 * dim) / 3)


def load_pth(file: Path) -> dict[str, torch.Tensor]:
    """A consolidated.NN.pth, memory-mapped; only the zip format can be, and weights_only=True
    lets its pickle build tensors and nothing else."""
    with open(file, "rb") as f:
        start = f.read(2)
    if start[:1] == b"\x80":  # a pickle's PROTO opcode, where a zip file has "PK"
        raise HerdError(f"{file}: a legacy (non-zip) .pth or a raw pickle: herd loads only the zip format torch.save "
                        "writes since PyTorch 1.6, with weights_only=True so that no file can run code; re-save it "
                        "with torch.save where you trust it")
    if start != b"PK" or not zipfile.is_zipfile(file):
        raise HerdError(f"{file}: not a readable PyTorch checkpoint, corrupt or truncated (not a zip file)")
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        raise HerdError(f"{file}: refused to load: it pickles objects other than tensors, which could run "
                        f"code ({detail or 'not a weights-only checkpoint'})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise HerdError(f"{file}: not a readable PyTorch checkpoint, corrupt or truncated "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and k.isprintable() and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise HerdError(f"{file}: expected a dict of tensor names (printable text) to tensors")
    for name, t in sd.items():
        if not t.is_floating_point():
            raise HerdError(f"{file}: tensor {name} is {t.dtype}, not floating point")
    _check_records(file, sd)
    sd.pop("rope.freqs", None)  # Llama 2's precomputed rotary table; the model recomputes it
    return sd


def _check_records(file: Path, sd: dict[str, torch.Tensor]) -> None:
    """Each tensor's storage must be one of the file's data records, whole: memory-mapped, torch
    takes the size the pickle claims from the record's start, reading past a short record into
    the rest of the file."""
    with zipfile.ZipFile(file) as z:
        records = sorted(i.file_size for i in z.infolist() if i.filename.split("/")[-2:-1] == ["data"] and i.file_size)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in sd.values()}
    if sorted(n for n in storages.values() if n) != records:
        raise HerdError(f"{file}: corrupt: its tensors' sizes do not match its data records")


def split_dim(name: str, shard: torch.Tensor, dim: int) -> int | None:
    """The dimension along which Meta's model-parallel ranks split tensor `name` (None: every rank
    holds all of it); `shard` is one rank's slice, `dim` the model width."""
    key = name.split(".", 2)[2] if name.startswith("layers.") else name
    if key == "tok_embeddings.weight":
        return 0 if shard.shape[1] == dim else 1
    return _SPLIT_DIM.get(key)


def _merge(path: Path, shards: list[dict[str, torch.Tensor]], dim: int) -> dict[str, torch.Tensor]:
    """One state dict from the model-parallel shards."""
    if len(shards) == 1:
        return shards[0]
    for i, shard in enumerate(shards[1:], 1):
        if shard.keys() != shards[0].keys():
            raise HerdError(f"{path}: consolidated.{i:02d}.pth holds other tensors than consolidated.00.pth")
    merged = {}
    for name in list(shards[0]):
        parts = [shard.pop(name) for shard in shards]  # drop each slice once it is merged
        d = split_dim(name, parts[0], dim)
        try:
            merged[name] = parts[0] if d is None else torch.cat(parts, dim=d)
        except RuntimeError as e:
            raise HerdError(f"{path}: cannot merge {name} across {len(parts)} shards ({e})") from None
    return merged


def _field(path: Path, params: dict, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """params[key], checked to be of `kind`; `default` when absent or null (no default: required)."""
    if key not in params or params[key] is None:
        if default is ...:
            raise HerdError(f"{path}: lacks {key}")
        return default
    value = params[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        wanted = {int: "an integer", bool: "true or false"}.get(kind, "a number")
        raise HerdError(f"{path}: {key} must be {wanted}, got {value!r}")
    return value


def _ffn_width(file: Path, params: dict, dim: int) -> int:
    """The SwiGLU width params.json implies, once its three inputs are known to be sane."""
    multiple_of = _field(file, params, "multiple_of", int, 256)
    multiplier = _field(file, params, "ffn_dim_multiplier", (int, float), None)
    if not 0 < dim <= MAX_WIDTH:
        raise HerdError(f"{file}: dim must be a positive integer up to {MAX_WIDTH}, got {dim}")
    if not 0 < multiple_of <= MAX_WIDTH:
        raise HerdError(f"{file}: multiple_of must be a positive integer up to {MAX_WIDTH}, got {multiple_of}")
    if multiplier is not None and not 0 < multiplier <= 64:  # released models: 1.3 and 1.5; NaN fails too
        raise HerdError(f"{file}: ffn_dim_multiplier must be a positive number up to 64, got {multiplier}")
    return meta_hidden_dim(dim, multiple_of, multiplier)


def config_from_params(path: Path, params: dict, state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """ModelConfig from params.json; vocab_size -1 (Llama 1/2) is read off the embedding."""
    file = path / "params.json"
    num = (int, float)
    dim = _field(file, params, "dim", int)
    vocab = _field(file, params, "vocab_size", int, -1)
    if vocab <= 0:
        if "tok_embeddings.weight" not in state_dict:
            raise HerdError(f"{path}: vocab_size is {vocab} and there is no tok_embeddings.weight to read it from")
        vocab = state_dict["tok_embeddings.weight"].shape[0]
    hidden_dim = _ffn_width(file, params, dim)
    scaling = None
    if _field(file, params, "use_scaled_rope", bool, False):
        scaling = RopeScaling(factor=float(_field(file, params, "rope_scaling_factor", num, 8.0)),
                              low_freq_factor=float(_field(file, params, "rope_low_freq_factor", num, 1.0)),
                              high_freq_factor=float(_field(file, params, "rope_high_freq_factor", num, 4.0)),
                              original_max_position=_field(file, params, "rope_original_max_position", int, 8192))
    cfg = make_config(
        file, {"hidden_dim": "the feed-forward width that multiple_of and ffn_dim_multiplier give"}, dim=dim,
        n_layers=_field(file, params, "n_layers", int), n_heads=_field(file, params, "n_heads", int),
        n_kv_heads=_field(file, params, "n_kv_heads", int, None), vocab_size=vocab, hidden_dim=hidden_dim,
        norm_eps=float(_field(file, params, "norm_eps", num, 1e-5)),
        rope_theta=float(_field(file, params, "rope_theta", num, 10000.0)), rope_scaling=scaling,
        tie_embeddings="output.weight" not in state_dict,
        max_seq_len=_field(file, params, "max_seq_len", int, 2048), name=path.resolve().name,
    )
    cfg = tie_if_equal(cfg, state_dict)
    known = registered_match(cfg)
    if known is not None:
        # Meta ships Llama 3.2 with use_scaled_rope but without its factor (32, not 3.1's 8),
        # and never says the context length: take both from the release with these shapes.
        cfg = cfg.replace(family=known.family)
        if "max_seq_len" not in params:
            cfg = cfg.replace(max_seq_len=known.max_seq_len)
        if scaling is not None and "rope_scaling_factor" not in params and known.rope_scaling is not None:
            cfg = cfg.replace(rope_scaling=known.rope_scaling)
    return cfg


def shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ...: one per model-parallel rank, numbered from 0."""
    files = sorted(path.glob("consolidated.*.pth"))
    wanted = [path / f"consolidated.{i:02d}.pth" for i in range(len(files))]
    if files != wanted:
        raise HerdError(f"{path}: model-parallel shards must be numbered from consolidated.00.pth up, "
                        f"found {', '.join(f.name for f in files)}")
    return files


def load_meta(path: Path, dtype: torch.dtype | None = None, tokenizer: bool = True) -> Checkpoint:
    params = read_json(path / "params.json")
    dim = _field(path / "params.json", params, "dim", int)
    files = shard_files(path)
    state_dict = _merge(path, [load_pth(f) for f in files], dim)  # mapped from the files, not read
    cfg = config_from_params(path, params, state_dict)
    check_fits(path, cfg, len(state_dict), sum(t.numel() for t in state_dict.values()))
    check_state_dict(path, cfg, state_dict)
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    tok, template, eos = directory_extras(path, tokenizer)
    return Checkpoint(cfg, state_dict, "meta", path, tok, template, eos)


class _CountingWriter:
    """A file that advances a progress bar by the bytes written through it."""

    def __init__(self, f, bar: tqdm):
        self.f, self.bar = f, bar

    def write(self, data) -> int:
        self.bar.update(len(data))
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_meta(config: ModelConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path, *,
              progress: bool = False) -> Path:
    """Write params.json and a single consolidated.00.pth that Meta's reference code loads.
    Meta's model always has a classifier, so a tied model stores output.weight as the embedding
    itself (torch.save writes the shared tensor once)."""
    out = Path(out_dir)
    check_writable(out, config)
    sd = dict(state_dict)
    if config.tie_embeddings and "tok_embeddings.weight" in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    check_state_dict(out, config.replace(tie_embeddings=False), sd)
    multiple_of, multiplier = meta_ffn_params(config.dim, config.hidden_dim)
    params: dict[str, Any] = {
        "dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
        "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "use_scaled_rope": config.rope_scaling is not None, "max_seq_len": config.max_seq_len,
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        params.update(rope_scaling_factor=s.factor, rope_low_freq_factor=s.low_freq_factor,
                      rope_high_freq_factor=s.high_freq_factor, rope_original_max_position=s.original_max_position)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: sd[name].contiguous() for name in expected_shapes(config.replace(tie_embeddings=False))}
    if config.tie_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    total = sum(t.numel() * t.element_size() for name, t in tensors.items()
                if not (config.tie_embeddings and name == "output.weight"))
    with open(out / "consolidated.00.pth", "wb") as f, \
            tqdm(total=total, desc=f"writing {out.name}", unit="B", unit_scale=True, disable=not progress) as bar:
        torch.save(tensors, _CountingWriter(f, bar))
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return out
