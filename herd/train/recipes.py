"""`herd pretrain` and `herd finetune`: build the model, the data and the objective, run the
trainer, and leave a loadable model in the run directory:
  OUT/model/     HF directory + tokenizer (pretraining, full fine-tuning, or a merged adapter)
  OUT/adapter/   PEFT adapter (LoRA / QLoRA)
  OUT/metrics.jsonl, OUT/loss.png, OUT/config.json, OUT/checkpoints/
model/ and adapter/ name the checkpoint they were made from (herd_checkpoint.json), so that
--resume of a finished run writes them if a kill cut that short, and otherwise does nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from herd.checkpoint import build_model, load_checkpoint, read_tokenizer, save_hf
from herd.checkpoint.peft import load_adapter, save_adapter
from herd.config import ModelConfig, get_config
from herd.errors import HerdError
from herd.llm import resolve_dtype
from herd.model import Transformer
from herd.model.lora import LoraConfig, adapters, add_adapter, merge_adapter
from herd.quant.nf4 import quantize_linears_nf4
from herd.store import resolve_model
from herd.tokenizer import ChatFormat, Tokenizer, chat_format_for, load_tokenizer
from herd.train import checkpointing
from herd.train.config import TrainConfig
from herd.train.data import Corpus, Packed, Pairs, Split, Windows, load_corpus, open_data, unigram_loss
from herd.train.distributed import Dist, barrier, setup, teardown
from herd.train.objectives import DPO, LanguageModeling, WithReference, sequence_logps
from herd.train.trainer import Run, Trainer


def model_config(vocab_size: int, seq_len: int, name: str | None = None, dim: int = 288, n_layers: int = 6,
                 n_heads: int = 6, n_kv_heads: int | None = None, hidden_dim: int | None = None,
                 tie_embeddings: bool = True, rope_theta: float = 10000.0) -> ModelConfig:
    """The shape to pretrain: a registered one (`name`, e.g. stories15m) or the given sizes; the
    vocabulary is the tokenizer's and the context the training sequence length. The SwiGLU width
    defaults to Llama's 8/3 x dim, rounded up to a multiple of 32."""
    if name:
        return get_config(name).replace(vocab_size=vocab_size, max_seq_len=seq_len, name=name)
    hidden = hidden_dim or 32 * math.ceil(8 * dim / 3 / 32)
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                       hidden_dim=hidden, rope_theta=rope_theta, tie_embeddings=tie_embeddings, max_seq_len=seq_len)


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> Transformer:
    """GPT-2 / llama2.c initialisation: N(0, 0.02) for every matrix, with the projections back
    into the residual stream (wo, w2) scaled down by sqrt(2 x layers); norms at 1."""
    torch.manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02)
    return model


SOURCE = "herd_checkpoint.json"  # in a published directory: the checkpoint it was made from


def _copy_export(ckpt: Path, out: Path) -> None:
    shutil.copytree(ckpt / "export", out)


def _publish(run_dir: Path, name: str, d: Dist, write: Callable[[Path, Path], None] = _copy_export) -> Path:
    """Make OUT/name from the newest checkpoint with write(checkpoint, directory), via a temporary
    name and a rename; nothing when OUT/name was made from that checkpoint already."""
    target = run_dir / name
    if d.main:
        newest = checkpointing.checkpoints(run_dir)[-1]
        source = {"checkpoint": newest.name, **checkpointing.trainer_state(newest)}
        if _source(target) != source:
            tmp = run_dir / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            write(newest, tmp)
            (tmp / SOURCE).write_text(json.dumps(source, indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
    barrier(d)
    return target


def _source(published: Path) -> dict | None:
    try:
        return json.loads((published / SOURCE).read_text())
    except (OSError, ValueError):
        return None


def _save_model(cfg: ModelConfig, tok: Tokenizer, eos_ids: set[int], out: Path, sd: dict[str, torch.Tensor]) -> None:
    save_hf(cfg, sd, out, eos_ids=eos_ids)
    tok.save(out)


def pretrain(data: str | Path, cfg: TrainConfig, shape: dict | None = None, resume: bool = False) -> Path:
    """Train a Llama from scratch on a prepared text corpus; returns OUT/model. `shape` holds
    the keyword arguments of `model_config` (name, dim, n_layers, ...)."""
    d = setup(cfg.device)
    try:
        corpus = load_corpus(data)
        if corpus.kind != "text":
            raise HerdError(f"{data}: holds {corpus.kind} data; pretraining needs plain text (use finetune)")
        tok = load_tokenizer(corpus.tokenizer_dir)
        mcfg = model_config(corpus.vocab_size, cfg.seq_len, **(shape or {}))
        model = init_weights(Transformer(mcfg), cfg.seed).to(d.device)
        rows = cfg.batch_size * cfg.grad_accum * d.world
        train = Windows(corpus.train, cfg.seq_len, rows, cfg.seed)
        val = Windows(corpus.val, cfg.seq_len, rows, cfg.seed) if corpus.val is not None else None
        extra = {"params": sum(p.numel() for p in model.parameters()), "train_tokens": corpus.train.n_tokens}
        if corpus.val is not None:
            extra["unigram_val_loss"] = unigram_loss(corpus.train.stream(), corpus.val.stream(), corpus.vocab_size)
        run = Run(model, LanguageModeling(), train, val,
                  export=lambda out, sd: _save_model(mcfg, tok, tok.eos_ids, out, sd),
                  data=corpus.fingerprint(), title=f"pretrain {Path(cfg.out).name}", extra_log=extra)
        Trainer(run, cfg, d).fit(resume)
        return _publish(Path(cfg.out), "model", d)
    finally:
        teardown()


def load_base(model: str | Path | None, dtype: str, device: str, tokenizer: str | Path | None):
    """(path, checkpoint, tokenizer, chat format or None) of a base model to fine-tune."""
    path, _ = resolve_model(None if model is None else str(model))
    ckpt = load_checkpoint(path, dtype=resolve_dtype(dtype, device))
    tok = read_tokenizer(tokenizer) if tokenizer is not None else ckpt.tokenizer
    if tok is None:
        raise HerdError(f"{path}: no tokenizer beside the weights; pass one with --tokenizer")
    if ckpt.chat_template and tok.chat_template is None:
        tok.chat_template = ckpt.chat_template
    try:
        fmt: ChatFormat | None = chat_format_for(tok, ckpt.config.family)
    except HerdError:
        fmt = None
    return path, ckpt, tok, fmt


def finetune(base: str | Path, data: str | Path, cfg: TrainConfig, method: str = "sft", lora: LoraConfig | None = None,
             qlora: bool = False, beta: float = 0.1, dtype: str = "auto", val_data: str | Path | None = None,
             tokenizer: str | Path | None = None, merge: bool = False, resume: bool = False) -> Path:
    """Supervised fine-tuning (method "sft") or DPO ("dpo") of a checkpoint on JSONL records or a
    prepared corpus; with `lora` only adapters train (on an NF4 base with `qlora`). Returns
    OUT/adapter (LoRA) or OUT/model."""
    if method not in ("sft", "dpo"):
        raise HerdError(f"unknown method {method!r}; use sft or dpo")
    if qlora and lora is None:
        raise HerdError("QLoRA trains LoRA adapters on a 4-bit base: give LoRA settings (--lora-r) too")
    d = setup(cfg.device)
    try:
        path, ckpt, tok, fmt = load_base(base, dtype, cfg.device, tokenizer)
        corpus, val_split = _open_corpora(data, val_data, tok, fmt, method)
        mcfg = ckpt.config
        model = build_model(ckpt, d.device)
        del ckpt
        if lora is not None:
            lora.base_model = lora.base_model or str(base)
            _add_lora(model, lora, qlora)
        rows = cfg.batch_size * cfg.grad_accum * d.world
        if method == "sft":
            objective, unit = LanguageModeling(), "tok"
            train = Packed(corpus.train, cfg.seq_len, rows, cfg.seed)
            val = Packed(val_split, cfg.seq_len, rows, cfg.seed) if val_split is not None else None
        else:
            objective, unit = DPO(beta), "pair"
            reference = _reference(model, lora is not None)
            train = WithReference(Pairs(corpus.train, cfg.seq_len, rows, cfg.seed), reference, cfg.batch_size)
            val = (WithReference(Pairs(val_split, cfg.seq_len, rows, cfg.seed), reference, cfg.batch_size)
                   if val_split is not None else None)
        if lora is not None:
            export = lambda out, sd: save_adapter(model, out, lora, state_dict=sd)  # noqa: E731
        else:
            export = lambda out, sd: _save_model(mcfg, tok, tok.eos_ids, out, sd)  # noqa: E731
        run = Run(model, objective, train, val, export, data=corpus.fingerprint(), trainable_only=lora is not None,
                  title=f"{method} {Path(cfg.out).name}", unit=unit)
        Trainer(run, cfg, d).fit(resume)
        out = _publish(Path(cfg.out), "adapter" if lora is not None else "model", d)
        if merge and lora is not None:
            _publish_merged(Path(cfg.out), path, tok, dtype, d)
        return out
    finally:
        teardown()


def _open_corpora(data: str | Path, val_data: str | Path | None, tok: Tokenizer, fmt: ChatFormat | None,
                  method: str) -> tuple[Corpus, Split | None]:
    """The training corpus and the validation split (of `val_data` when given, else the corpus's
    own), refusing data of a kind `method` cannot train on."""
    corpus = open_data(data, tok, fmt)
    val_corpus: Corpus | None = open_data(val_data, tok, fmt) if val_data else None
    wanted = ("preference",) if method == "dpo" else ("sft", "text")
    for c in filter(None, (corpus, val_corpus)):
        if c.kind not in wanted:
            raise HerdError(f"{c.path}: holds {c.kind} data, which {method} cannot train on")
    return corpus, val_corpus.train if val_corpus else corpus.val


def _add_lora(model: Transformer, lora: LoraConfig, qlora: bool) -> None:
    """Wrap the model's linears in trainable adapters, over a 4-bit NF4 base with `qlora`."""
    if qlora:
        quantize_linears_nf4(model)  # the classifier, tied to the embedding, stays as it is
        with torch.no_grad():  # own copies of the rest, so the file mapping of the weights is let go
            for p in model.parameters():
                p.data = p.data.clone()
    add_adapter(model, lora)


def _publish_merged(run_dir: Path, base: Path, tok: Tokenizer, dtype: str, d: Dist) -> None:
    """OUT/model: the full-precision base with the newest checkpoint's adapter folded in."""
    def write_merged(ckpt: Path, directory: Path) -> None:
        merged = load_merged(base, ckpt / "export", dtype)
        _save_model(merged.config, tok, tok.eos_ids, directory, merged.state_dict())

    _publish(run_dir, "model", d, write_merged)


def _reference(model: Transformer, lora: bool):
    """Log-probabilities under the model as it is before training (adapters switched off)."""
    def logps(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if not lora:
            return sequence_logps(model, batch).cpu()
        with adapters(model, None):
            return sequence_logps(model, batch).cpu()
    return logps


def load_merged(base: str | Path, adapter: str | Path, dtype: str = "auto") -> Transformer:
    """A plain model: `base` (full precision, whatever a QLoRA run trained against) with the
    PEFT adapter at `adapter` folded in."""
    model = build_model(load_checkpoint(resolve_model(str(base))[0], resolve_dtype(dtype, "cpu"), tokenizer=False))
    load_adapter(model, adapter)
    return merge_adapter(model)
