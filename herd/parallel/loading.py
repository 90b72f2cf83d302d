"""Rank k's weights, read without the whole model: each rank reads only its slices.

A source answers `read(name, slice)` for herd's tensor names, where a slice is (dim, start, stop)
or None (the whole tensor): HF safetensors through `safe_open(...).get_slice`; Meta's
consolidated.NN.pth memory-mapped, shard k alone on rank k when there are as many shards as ranks
(other counts are resharded by reading the overlapping parts of each shard); GGUF from its memory
map, whole quantized rows (or whole blocks of columns) dequantized per slice. Formats without a
sliced reader (llama2.c, Llama 4 HF directories) are loaded whole on each rank and then sliced.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from herd.checkpoint.base import (
    Checkpoint,
    check_fits,
    check_shapes,
    directory_extras,
    expected_shapes,
    read_json,
)
from herd.checkpoint.gguf_file import gguf_extras, open_gguf, to_float
from herd.checkpoint.hf import (
    config_from_hf,
    hf_names,
    hf_to_interleaved,
    open_safetensors,
    tensor_headers,
    weight_files,
)
from herd.checkpoint.load import detect_format, load_checkpoint
from herd.checkpoint.meta import config_from_params, load_pth, shard_files, split_dim
from herd.checkpoint.packed import is_packed_dir
from herd.errors import HerdError
from herd.parallel.model import ShardedTransformer

Slice = tuple[int, int, int] | None


def rank_slice(full: tuple[int, ...], local: tuple[int, ...], rank: int) -> Slice:
    """The part of a tensor of shape `full` that rank `rank` holds in a tensor of shape `local`:
    the `rank`-th block along the one dimension where they differ (the last block may be short)."""
    for d, (f, n) in enumerate(zip(full, local)):
        if f != n:
            return d, rank * n, min((rank + 1) * n, f)
    return None


def narrow(t: torch.Tensor, sl: Slice) -> torch.Tensor:
    return t if sl is None else t.narrow(sl[0], sl[1], sl[2] - sl[1])


class HFSource:
    """Llama 1-3 safetensors, each slice read with get_slice (q/k rows made interleaved per head)."""

    def __init__(self, path: Path, hf: dict):
        self.path, self.format = path, "hf"
        self.config = cfg = config_from_hf(path, hf)
        headers = {n: h for n, h in tensor_headers(weight_files(path)).items() if not n.endswith("rotary_emb.inv_freq")}
        check_fits(path, cfg, len(headers), sum(int(np.prod(s)) for _, s in headers.values()))
        names = hf_names(cfg.n_layers)
        if cfg.tie_embeddings:
            names.pop("lm_head.weight")
        unknown = [n for n in headers if n not in names and not (n == "lm_head.weight" and cfg.tie_embeddings)]
        if unknown:
            raise HerdError(f"{path}: unexpected tensor {unknown[0]} for a {cfg.n_layers}-layer Llama")
        self.where = {names[n]: (file, n) for n, (file, _) in headers.items() if n in names}
        check_shapes(path, cfg, {names[n]: shape for n, (_, shape) in headers.items() if n in names})

    def read(self, name: str, sl: Slice) -> torch.Tensor:
        file, hf_name = self.where[name]
        with open_safetensors(file) as f:
            view = f.get_slice(hf_name)
            index = [slice(None)] * len(view.get_shape())
            if sl is not None:
                index[sl[0]] = slice(sl[1], sl[2])
            # a copy: the slice is a view of the file's mapping, which would keep every page it touched
            t = view[tuple(index)].clone(memory_format=torch.contiguous_format)
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = hf_to_interleaved(t, t.shape[0] // self.config.head_dim)
        return t

    def extras(self, tokenizer: bool) -> tuple:
        return directory_extras(self.path, tokenizer)


class MetaSource:
    """Meta's model-parallel shards, memory-mapped and opened only when a slice needs them: with
    as many shards as ranks, rank k reads consolidated.k.pth alone (and, for Llama 2's
    column-split embedding, its vocabulary rows of the others)."""

    def __init__(self, path: Path, rank: int):
        self.path, self.format = path, "meta"
        params = read_json(path / "params.json")
        self.files = shard_files(path)
        self.own = rank if rank < len(self.files) else 0
        self.shards: dict[int, dict[str, torch.Tensor]] = {}
        dim = params.get("dim")
        own = self.shard(self.own)
        n = len(self.files)
        self.split = {name: split_dim(name, t, dim) for name, t in own.items()}
        self.shapes = {name: tuple(s * (n if d == self.split[name] else 1) for d, s in enumerate(t.shape))
                       for name, t in own.items()}
        # What config_from_params reads off the weights: the vocabulary and whether there is a classifier
        # (a tied classifier stays a copy here: finding it would read both tensors whole).
        like = {name: torch.empty(self.shapes[name], device="meta") for name in ("tok_embeddings.weight",)
                if name in own}
        if "output.weight" in own:
            like["output.weight"] = torch.empty(0, device="meta")
        self.config = cfg = config_from_params(path, params, like)
        check_fits(path, cfg, len(self.shapes), sum(int(np.prod(s)) for s in self.shapes.values()))
        check_shapes(path, cfg, self.shapes)

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self.shards:
            self.shards[i] = load_pth(self.files[i])
        return self.shards[i]

    def read(self, name: str, sl: Slice) -> torch.Tensor:
        d_m, n = self.split[name], len(self.files)
        if d_m is None or n == 1:
            return narrow(self.shard(self.own)[name], sl).clone(memory_format=torch.contiguous_format)
        if sl is None or sl[0] != d_m:  # every shard holds some of it: take the slice from each
            return torch.cat([narrow(self.shard(i)[name], sl) for i in range(n)], dim=d_m)
        d, start, stop = sl
        per = self.shapes[name][d_m] // n
        parts = []
        for i in range(start // per, (stop - 1) // per + 1):
            lo, hi = max(start, i * per), min(stop, (i + 1) * per)
            parts.append(self.shard(i)[name].narrow(d, lo - i * per, hi - lo))
        return torch.cat(parts, dim=d) if len(parts) > 1 else parts[0].clone(memory_format=torch.contiguous_format)

    def extras(self, tokenizer: bool) -> tuple:
        return directory_extras(self.path, tokenizer)


class GGUFSource:
    """A GGUF file's tensors from its memory map: a slice of whole rows, or of whole quant blocks
    along a row, is dequantized alone; any other slice dequantizes the tensor first."""

    def __init__(self, path: Path):
        self.path, self.format = path, "gguf"
        self.file, self.config, names = open_gguf(path)
        self.where = {ours: name for name, ours in names.items() if name in self.file.tensors}

    def read(self, name: str, sl: Slice) -> torch.Tensor:
        g = self.where[name]
        shape, kind, data = self.file.tensors[g]
        if sl is not None and len(shape) == 2:
            (rows, cols), (block, size) = shape, GGML_QUANT_SIZES[kind]
            d, start, stop = sl
            if d == 0:
                data, shape, sl = data.reshape(rows, -1)[start:stop], (stop - start, cols), None
            elif start % block == 0 and stop % block == 0:
                blocks = data.reshape(rows, cols // block, size)[:, start // block: stop // block]
                data, shape, sl = blocks, (rows, stop - start), None
        values = to_float(self.path, g, shape, kind, np.ascontiguousarray(data).reshape(-1))
        return narrow(torch.from_numpy(np.array(values)), sl)

    def extras(self, tokenizer: bool) -> tuple:
        return gguf_extras(self.file.metadata, tokenizer)


class WholeSource:
    """A checkpoint read whole (formats without a sliced reader), then sliced."""

    def __init__(self, path: Path, dtype: torch.dtype | None):
        self.ckpt = load_checkpoint(path, dtype)
        self.path, self.format, self.config = path, self.ckpt.format, self.ckpt.config

    def read(self, name: str, sl: Slice) -> torch.Tensor:
        return narrow(self.ckpt.state_dict[name], sl).clone(memory_format=torch.contiguous_format)

    def extras(self, tokenizer: bool) -> tuple:
        return self.ckpt.tokenizer, self.ckpt.chat_template, self.ckpt.eos_ids


def open_source(path: str | Path, dtype: torch.dtype | None, rank: int = 0):
    """The sliced reader of the checkpoint at `path`; its config is known before any weight is read
    (except for formats read whole)."""
    path = Path(path)
    if is_packed_dir(path):
        raise HerdError(f"{path}: a quantized checkpoint; tensor parallelism runs float weights "
                        "(load the float checkpoint it was made from)")
    fmt = detect_format(path)
    if fmt == "hf":
        hf = read_json(path / "config.json")
        if hf.get("model_type") not in ("llama4", "llama4_text"):
            return HFSource(path, hf)
    if fmt == "meta":
        return MetaSource(path, rank)
    if fmt == "gguf":
        return GGUFSource(path)
    return WholeSource(path, dtype)


def _proc_field(file: str, key: str) -> int | None:
    """A number Linux reports in /proc/self/FILE on the line KEY (None where it does not)."""
    with contextlib.suppress(OSError, StopIteration), open(f"/proc/self/{file}") as f:
        return int(next(line for line in f if line.startswith(key + ":")).split()[1])
    return None


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes: Linux's VmHWM (ru_maxrss would
    carry over the peak of the process that forked this one)."""
    kib = _proc_field("status", "VmHWM")
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if kib is None else kib) * 1024


def load_shard(source, rank: int, world: int, dtype: torch.dtype | None, device: str = "cpu",
               experts: str = "across", tokenizer: bool = True) -> tuple[ShardedTransformer, Checkpoint, dict]:
    """Rank `rank`'s model built from `source`, its Checkpoint (config, tokenizer, end tokens; no
    weights) and what loading cost: {"read_bytes", "peak_rss"} (bytes)."""
    before = _proc_field("io", "read_bytes") or 0  # bytes read from storage; page-cache hits do not count
    cfg = source.config
    with torch.device("meta"):
        model = ShardedTransformer(cfg, rank, world, experts)
    full = expected_shapes(cfg)
    state_dict = {}
    for name, local in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        t = source.read(name, rank_slice(full[name], tuple(local.shape), rank))
        if t.shape != local.shape:  # the last rank's vocabulary rows, padded
            t = torch.cat([t, t.new_zeros((local.shape[0] - t.shape[0], *t.shape[1:]))])
        state_dict[name] = t.to(dtype or t.dtype)
    if cfg.tie_embeddings:
        state_dict["output.weight"] = state_dict["tok_embeddings.weight"]
    model.load_state_dict(state_dict, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    ckpt = Checkpoint(cfg, {}, source.format, source.path, *source.extras(tokenizer))
    report = {"read_bytes": (_proc_field("io", "read_bytes") or 0) - before, "peak_rss": peak_rss()}
    return model.to(device).eval(), ckpt, report
