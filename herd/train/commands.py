"""The training subcommands of `herd`: train-tokenizer, prepare-data, pretrain, finetune.

Options come from three places, strongest first: the command line, a recipe file (`--config
run.yaml|.toml`, a flat mapping of option names to values), the built-in defaults. So every
option is parsed with default None and the defaults are applied after the recipe.

`herd --help` builds these parsers, so each command imports its machinery (torch, the tokenizer
trainer) when it runs, as herd.cli's commands do.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from herd.cli_args import COUNT, FRACTION, NATURAL, POSITIVE, device_arg
from herd.errors import HerdError
from herd.train.config import PARALLEL, PRECISIONS, TrainConfig, read_recipe

# Defaults of the options that are not TrainConfig fields.
_DEFAULTS: dict[str, Any] = {
    "dim": 288, "n_layers": 6, "n_heads": 6, "tie_embeddings": True, "rope_theta": 10000.0,
    "method": "sft", "lora_r": 16, "lora_alpha": None, "lora_dropout": 0.05, "lora_targets": "all",
    "beta": 0.1, "dtype": "auto", "qlora": False, "merge": False, "resume": False,
}
# TrainConfig defaults a command changes: fine-tuning runs are short and use a higher LR on adapters.
_FINETUNE_DEFAULTS = {"steps": 100, "lr": 2e-4, "min_lr": 2e-5, "warmup": 10, "weight_decay": 0.0, "seq_len": 512,
                      "batch_size": 4}


def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults in brackets)")
    add = g.add_argument
    add("-o", "--out", help="run directory: checkpoints, metrics.jsonl, loss.png and the trained model")
    add("--config", help="recipe file (.yaml, .toml or .json) of option names and values; flags override it")
    add("--resume", action=argparse.BooleanOptionalAction, default=None,
        help="continue from the newest checkpoint in --out exactly where it stopped")
    add("--steps", type=int, help="optimizer steps [pretrain 1000, finetune 100]")
    add("--batch-size", type=int, help="sequences (pairs for DPO) per process per micro-step [8; finetune 4]")
    add("--grad-accum", type=int, help="micro-steps per optimizer step [1]")
    add("--seq-len", type=int, help="tokens per training sequence [256; finetune 512]")
    add("--lr", type=float, help="peak learning rate [3e-4; finetune 2e-4]")
    add("--min-lr", type=float, help="learning rate at the end of the cosine [3e-5; finetune 2e-5]")
    add("--warmup", type=int, help="linear warmup steps [0; finetune 10]")
    add("--weight-decay", type=float, help="AdamW weight decay of matrices [0.1; finetune 0]")
    add("--beta1", type=float, help="[0.9]")
    add("--beta2", type=float, help="[0.95]")
    add("--grad-clip", type=float, help="clip the gradient norm to this (0: off) [1.0]")
    add("--precision", choices=PRECISIONS, help="bf16 autocast, or fp32; auto: bf16 on CUDA, fp32 on CPU [auto]")
    add("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="recompute each block's activations in backward: less memory, ~30%% more time")
    add("--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile each block: fuses the elementwise work between the matrix multiplies; the first "
             "step compiles (~30 s on one core, cached after); needs a C++ compiler on the CPU [off]")
    add("--eval-every", type=int, help="validation every N steps (0: at the end) [0]")
    add("--eval-batches", type=int, help="batches per validation [8]")
    add("--save-every", type=int, help="checkpoint every N steps (0: at the end) [0]")
    add("--keep", type=int, help="checkpoints kept on disk [2]")
    add("--log-every", type=int, help="metrics line every N steps [10]")
    add("--seed", type=int, help="[1337]")
    add("--parallel", choices=PARALLEL, help="under torchrun: replicate (ddp) or shard (fsdp) the model [ddp]")
    add("--device", type=device_arg, help="cpu, cuda, ... [cpu]")
    add("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar [on]")


def _merge(args: argparse.Namespace, parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> dict[str, Any]:
    """Command line over recipe over defaults."""
    known = {a.dest for a in parser._actions} - {"help", "config", "func"}
    recipe = read_recipe(args.config) if args.config else {}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise HerdError(f"{args.config}: unknown option(s) {', '.join(unknown)}")
    given = {k: v for k, v in vars(args).items() if k in known and v is not None}
    return {**defaults, **recipe, **given}


def _train_config(opts: dict[str, Any]):
    if not opts.get("out"):
        raise HerdError("no run directory: give --out (or `out` in the recipe)")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in opts.items() if k in fields})


def _layers(spec: Any) -> list[int] | None:
    """"20-29", "0,5,7", a list of ints, or None/"all"."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, list):
        return [int(x) for x in spec]
    out: list[int] = []
    try:
        for part in str(spec).split(","):
            a, _, b = part.partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise HerdError(f"--lora-layers: {spec!r} is not like 20-29 or 0,5,7") from None
    return out


def _print_once(value: Any) -> None:
    """Print on the first process only (torchrun starts one per rank)."""
    if os.environ.get("RANK", "0") == "0":
        print(value)


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from herd.train.vocab import train_tokenizer

    if not args.out:
        raise HerdError("give the output directory with --out")
    tok = train_tokenizer(args.inputs, args.out, args.vocab_size, max_sentences=args.max_sentences)
    print(f"{args.out}: {tok.vocab_size} tokens")


def cmd_prepare_data(args: argparse.Namespace) -> None:
    from herd.train.data import prepare_data

    if not args.out:
        raise HerdError("give the output directory with --out")
    if bool(args.tokenizer) == bool(args.model):
        raise HerdError("give the tokenizer: --tokenizer PATH, or --model with the model the data is for")
    if args.model:
        from herd.train.recipes import load_base

        _, _, tok, fmt = load_base(args.model, "auto", "cpu", None)
    else:
        from herd.checkpoint import read_tokenizer
        from herd.tokenizer import chat_format_for

        tok = read_tokenizer(args.tokenizer)
        try:
            fmt = chat_format_for(tok)
        except HerdError:
            fmt = None
    corpus = prepare_data(args.inputs, args.out, tok, fmt, val_fraction=args.val_fraction, separator=args.separator)
    val = corpus.val.n_tokens if corpus.val else 0
    print(f"{args.out}: {corpus.kind} corpus, {corpus.train.n_tokens:,} training and {val:,} validation tokens")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from herd.train.recipes import pretrain

    opts = _merge(args, args.parser, _DEFAULTS)
    if not opts.get("data"):
        raise HerdError("no data: give --data (a directory made by `herd prepare-data`)")
    shape = {k: opts.get(k) for k in ("name", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                                      "tie_embeddings", "rope_theta")}
    out = pretrain(opts["data"], _train_config(opts), shape, resume=opts["resume"])
    _print_once(out)


def cmd_finetune(args: argparse.Namespace) -> None:
    from herd.model.lora import ALL_LINEAR, LoraConfig
    from herd.train.recipes import finetune

    opts = _merge(args, args.parser, {**_DEFAULTS, **_FINETUNE_DEFAULTS})
    if not opts.get("data"):
        raise HerdError("no data: give --data (a JSONL file or a directory made by `herd prepare-data`)")
    lora = None
    if opts["lora_r"]:
        targets = opts["lora_targets"]
        targets = ALL_LINEAR if targets == "all" else targets.split(",") if isinstance(targets, str) else targets
        lora = LoraConfig(r=opts["lora_r"], alpha=opts["lora_alpha"] or 2.0 * opts["lora_r"],
                          dropout=opts["lora_dropout"], targets=targets, layers=_layers(opts.get("lora_layers")))
    out = finetune(opts.get("model"), opts["data"], _train_config(opts), method=opts["method"], lora=lora,
                   qlora=opts["qlora"], beta=opts["beta"], dtype=opts["dtype"], val_data=opts.get("val_data"),
                   tokenizer=opts.get("tokenizer"), merge=opts["merge"], resume=opts["resume"])
    _print_once(out)


def add_commands(sub) -> None:
    """Register the training subcommands on `herd`'s subparsers."""
    for add in (_add_train_tokenizer, _add_prepare_data, _add_pretrain, _add_finetune):
        add(sub)


def _add_train_tokenizer(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="train a SentencePiece BPE tokenizer on text files",
                       description="Train a SentencePiece BPE tokenizer (byte fallback, digits split) on text files.")
    p.add_argument("inputs", nargs="+", metavar="FILE")
    p.add_argument("-o", "--out", help="directory for tokenizer.model and tokenizer_config.json")
    p.add_argument("--vocab-size", type=COUNT, default=4096, help="(default: 4096)")
    p.add_argument("--max-sentences", type=COUNT, default=2_000_000, help="lines sampled for training (default: 2M)")
    p.set_defaults(func=cmd_train_tokenizer)


def _add_prepare_data(sub) -> None:
    p = sub.add_parser("prepare-data", help="tokenize text / JSONL into training shards", description=(
        "Tokenize text files (one document each, or split by --separator) or JSONL records (text; messages; "
        "prompt+completion; prompt+chosen+rejected) into memory-mapped token files with a validation split."))
    p.add_argument("inputs", nargs="+", metavar="FILE")
    p.add_argument("-o", "--out", help="new directory for the prepared corpus")
    p.add_argument("--tokenizer", help="tokenizer file or directory (e.g. from herd train-tokenizer)")
    p.add_argument("-m", "--model", help="or: the model the data is for (its tokenizer and chat format)")
    p.add_argument("--val-fraction", type=FRACTION, default=0.05, help="held out for validation (default: 0.05)")
    p.add_argument("--separator", help="string between documents in text files (default: a file is one document)")
    p.set_defaults(func=cmd_prepare_data)


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="train a Llama from scratch", description=(
        "Train a Llama from scratch on a corpus made by `herd prepare-data`. Runs on one process, or under "
        "`torchrun --nproc-per-node N -m herd pretrain ...` with --parallel ddp|fsdp."))
    p.add_argument("--data", help="prepared corpus directory")
    g = p.add_argument_group("model shape (defaults in brackets)")
    g.add_argument("--name", help="a registered shape (e.g. stories15m; see `herd info list`) instead of the sizes below")
    g.add_argument("--dim", type=COUNT, help="[288]")
    g.add_argument("--n-layers", type=COUNT, help="[6]")
    g.add_argument("--n-heads", type=COUNT, help="[6]")
    g.add_argument("--n-kv-heads", type=COUNT, help="[n-heads]")
    g.add_argument("--hidden-dim", type=COUNT, help="SwiGLU width [8/3 dim, rounded up to 32]")
    g.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None, help="[on]")
    g.add_argument("--rope-theta", type=POSITIVE, help="[10000]")
    _train_options(p)
    p.set_defaults(func=cmd_pretrain, parser=p)


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model (SFT or DPO; full, LoRA or QLoRA)", description=(
        "Fine-tune a checkpoint on JSONL records or a prepared corpus: supervised (chat messages or "
        "prompt/completion, loss on the replies) or DPO on prompt/chosen/rejected pairs; LoRA adapters by "
        "default (--lora-r 0: every weight), on a 4-bit NF4 base with --qlora."))
    p.add_argument("-m", "--model", help="base checkpoint path or store name (default: smollm2-135m-instruct)")
    p.add_argument("--tokenizer", help="tokenizer, when the checkpoint has none beside it")
    p.add_argument("--dtype", help="dtype of the base weights: auto (fp32 on CPU), bfloat16, ... [auto]")
    p.add_argument("--data", help="JSONL file or prepared corpus")
    p.add_argument("--val-data", help="validation JSONL / corpus (default: the corpus's own split, if any)")
    p.add_argument("--method", choices=["sft", "dpo"], help="[sft]")
    p.add_argument("--beta", type=POSITIVE, help="DPO: strength of the pull towards the reference [0.1]")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=NATURAL, help="adapter rank; 0 trains every weight instead [16]")
    g.add_argument("--lora-alpha", type=POSITIVE, help="update scale alpha / r [2 r]")
    g.add_argument("--lora-dropout", type=FRACTION, help="[0.05]")
    g.add_argument("--lora-targets", help="comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,"
                                          "lm_head, or all [all]")
    g.add_argument("--lora-layers", help="blocks to adapt, like 20-29 or 0,5 [all]")
    g.add_argument("--qlora", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the frozen base in 4-bit NF4")
    g.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                   help="also write OUT/model: the base with the adapter folded in")
    _train_options(p)
    p.set_defaults(func=cmd_finetune, parser=p)

