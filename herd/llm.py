"""The public Python API: `herd.load()` gives an `LLM` that generates, streams and chats."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from herd.checkpoint import detect_format, load_model, read_config, read_tokenizer
from herd.checkpoint.packed import is_packed_dir
from herd.checkpoint.peft import load_adapters
from herd.config import ModelConfig
from herd.errors import HerdError
from herd.generate import SamplingParams, Sequence, run_batch
from herd.generate.params import make_params
from herd.generate.speculative import make_drafter, speculative_decode
from herd.model import Transformer
from herd.store import check_name, import_model, resolve_model
from herd.tokenizer import ChatFormat, ChatReply, Tokenizer, chat_format_for, parse_tool_calls
from herd.tokenizer.guard import GuardVerdict, LlamaGuard3, parse_guard
from herd.tokenizer.infill import infill_ids, infill_stop_ids

class LLM:
    """A loaded model with its tokenizer and chat format."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, chat_format: ChatFormat | None = None,
                 eos_ids: set[int] | None = None, name: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.eos_ids = set(eos_ids or ()) | set(tokenizer.eos_ids)
        self.name = name
        self.drafter = None  # speculative decoding of single prompts, see speculate()
        self.draft_tokens = 5
        self.adapters: list[str] = []  # LoRA adapters loaded onto the model, picked per request

    def load_adapters(self, paths: dict[str, str | Path]) -> None:
        """Load PEFT LoRA adapters (name -> directory) onto the model; none applies until a
        request names one (`Request.adapter` of the serving engine)."""
        from herd.parallel import ShardedTransformer

        if paths and isinstance(self.model, ShardedTransformer):
            raise HerdError("LoRA adapters are not supported with tensor parallelism (--tp)")
        load_adapters(self.model, paths)
        self.adapters += list(paths)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def speculate(self, draft: LLM | str | Path | None = None, lookup: bool = False, tokens: int = 5) -> LLM:
        """Decode single prompts speculatively from now on: drafts from a smaller model with the same
        tokenizer (`draft`, an LLM or what herd.load takes) or by prompt lookup; `tokens` per round.
        Greedy output is unchanged token for token; sampled output keeps its distribution."""
        self.drafter, self.draft_tokens = load_drafter(self, draft, lookup), tokens
        return self

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a plain-text prompt, with BOS where the model expects it. An empty
        prompt gives BOS alone: generation then starts from scratch, as llama2.c does."""
        ids = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)
        if not ids and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]
        if not ids:
            raise HerdError("the prompt is empty and this tokenizer has no BOS token to start from")
        return ids

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self._chat_format().encode(self.tokenizer, messages, add_generation_prompt=True, tools=tools)

    def chat_stop_ids(self) -> set[int]:
        """Every token that ends an assistant reply."""
        return self.eos_ids | self._chat_format().stop_ids(self.tokenizer)

    def sequence(self, ids: list[int], params: SamplingParams, stop_ids: set[int], ctx: int | None = None) -> Sequence:
        """A sequence of prompt `ids` to generate within `ctx` positions (default: the model's
        context): max_tokens, or fewer where the context ends first. A prompt that leaves no room
        is an error, never silently truncated. The serving engine builds its sequences here too."""
        ctx = ctx or self.config.max_seq_len
        if len(ids) >= ctx:
            raise HerdError(f"the prompt is {len(ids)} tokens but the context is {ctx} tokens")
        return Sequence(ids, params, self.tokenizer, stop_ids, self.config.vocab_size,
                        limit=min(params.max_tokens, ctx - len(ids)))

    def sequences(self, prompts: list[list[int]], params: SamplingParams, stop_ids: set[int]) -> list[Sequence]:
        """Sequences ready for `run_batch`, one per prompt (see `sequence`)."""
        return [self.sequence(ids, params, stop_ids) for ids in prompts]

    def generate(self, prompt: str | list[str], **options) -> str | list[str]:
        """Complete `prompt` (or each of a list of prompts, in one batch); options are the
        fields of `SamplingParams` (max_tokens, temperature, top_p, stop, seed, ...)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seqs = self._run([self.encode(p) for p in prompts], options, self.eos_ids)
        texts = [s.text for s in seqs]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Text pieces of the completion of `prompt` as they are generated."""
        yield from self._stream(self.encode(prompt), options, self.eos_ids)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, **options) -> str | ChatReply:
        """The assistant's reply to an OpenAI-style list of {"role", "content"} messages.

        With `tools` (OpenAI-shaped), a ChatReply: `.content`, `.tool_calls` parsed from the
        reply ([] when it is plain text), `.error` when it looked like a call but was malformed,
        and `.to_message()` to append it to the conversation."""
        if tools is None:
            return "".join(self.stream_chat(messages, **options))
        (seq,) = self._run([self.encode_chat(messages, tools)], options, self.chat_stop_ids())
        reply = parse_tool_calls(seq.text)
        reply.finish_reason = reply.finish_reason or seq.finish_reason
        return reply

    def stream_chat(self, messages: list[dict], tools: list[dict] | None = None, **options) -> Iterator[str]:
        """Text pieces of the reply; with tools, feed the joined text to `parse_tool_calls`."""
        yield from self._stream(self.encode_chat(messages, tools), options, self.chat_stop_ids())

    def encode_infill(self, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
        """Code Llama's infilling prompt: the model writes what goes between prefix and suffix."""
        return infill_ids(self.tokenizer, prefix, suffix, suffix_first)

    def infill_stop_ids(self) -> set[int]:
        return self.eos_ids | infill_stop_ids(self.tokenizer)

    def infill(self, prefix: str, suffix: str, suffix_first: bool = False, **options) -> str:
        """The middle a Code Llama model writes between `prefix` and `suffix` (ends at <EOT>)."""
        return "".join(self.stream_infill(prefix, suffix, suffix_first, **options))

    def stream_infill(self, prefix: str, suffix: str, suffix_first: bool = False, **options) -> Iterator[str]:
        yield from self._stream(self.encode_infill(prefix, suffix, suffix_first), options, self.infill_stop_ids())

    def moderate(self, conversation: str | list[dict], categories: dict[str, str] | list[str] | None = None,
                 excluded: list[str] = (), max_tokens: int = 20) -> GuardVerdict:
        """Llama Guard 3's verdict on the last turn of `conversation` (a user message as a str, or
        user/assistant messages); this LLM must be a Llama Guard model. Greedy, as Meta runs it."""
        guard = LlamaGuard3(categories, excluded)
        messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
        ids = guard.encode(self.tokenizer, messages)
        (seq,) = self._run([ids], {"max_tokens": max_tokens, "temperature": 0.0},
                           self.eos_ids | guard.stop_ids(self.tokenizer))
        return parse_guard(seq.text, guard.categories)

    def _chat_format(self) -> ChatFormat:
        if self.chat_format is None:
            raise HerdError(f"model {self.name or ''} has no chat format (no chat template and an unknown family)")
        return self.chat_format

    def _stream(self, ids: list[int], options: dict, stop_ids: set[int]) -> Iterator[str]:
        (seq,) = seqs = self.sequences([ids], make_params(options), stop_ids)
        for events in self.decode(seqs):
            for _, text in events:
                if text:
                    yield text

    def _run(self, prompts: list[list[int]], options: dict, stop_ids: set[int]) -> list[Sequence]:
        seqs = self.sequences(prompts, make_params(options), stop_ids)
        for _ in self.decode(seqs):
            pass
        return seqs

    def decode(self, seqs: list[Sequence]) -> Iterator[list[tuple[int, str]]]:
        """Run `seqs` (from `sequence`) to their end: each step's (index, new text) pairs, so a
        caller that built its own sequence (its context, its prompt) sees its tokens as they come."""
        if self.drafter is not None and len(seqs) == 1:
            return speculative_decode(self.model, seqs[0], self.drafter, self.draft_tokens)
        return run_batch(self.model, seqs)


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """'auto' is fp32 on the CPU (CPU bf16 matmuls are very slow) and bf16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise HerdError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(names)}")
    return names[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """The device `device` names, if this machine has it. torch itself accepts "cuda:99" or
    "meta" and fails later, deep inside loading, with an AssertionError or a RuntimeError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HerdError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise HerdError(f"device {device!r}: {why}; use --device cpu")
        if (dev.index or 0) >= count:
            raise HerdError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise HerdError(f"device {device!r}: MPS (Apple GPU) is not available on this machine")
    elif dev.type != "cpu":
        raise HerdError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")
    return dev


def load_drafter(llm: LLM, draft: LLM | str | Path | None = None, lookup: bool = False):
    """`make_drafter`, with a `draft` given as a path or a store name loaded first (on `llm`'s device)."""
    if isinstance(draft, (str, Path)) and not lookup:  # with lookup too, make_drafter says to choose
        draft = load(draft, device=str(llm.model.device))
    return make_drafter(llm, draft, lookup)


def import_checkpoint(source: str | Path, name: str) -> Path:
    """`herd import`: put a local model into the store as `name` (then `-m name` loads it), once its
    header, config and tensor shapes show that herd loads it: a GGUF file, or a Hugging Face, Meta
    or herd quantized directory (a llama2.c .bin is one of several files: convert it first)."""
    check_name(name)
    path = Path(os.path.expanduser(source))
    if not is_packed_dir(path):
        if detect_format(path) == "llama2c":
            raise HerdError(f"{path}: a llama2.c file needs its tokenizer beside it; convert it to a directory "
                            f"first (`herd convert {path} DIR --to hf`) and import that")
        read_config(path)
    return import_model(path, name)


# Which kind of model each task needs and where one comes from (none is pullable into herd's store).
_NEEDS = {
    "infill": ("infill", "a Code Llama model (7B or 13B, base or Instruct), such as meta-llama/CodeLlama-7b-hf "
                         "or a GGUF of it"),
    "guard": ("classify messages", "a Llama Guard 3 model (1B or 8B), such as meta-llama/Llama-Guard-3-1B or a "
                                   "GGUF of it"),
}


def check_model_for(task: str, model: str | Path | None = None, tokenizer: str | Path | None = None) -> None:
    """Refuse a model that cannot do `task` ("infill" or "guard") from its vocabulary alone, before
    a weight is read (loading the default model takes seconds), saying which kind of model can and
    how to use one. A model whose tokenizer cannot be read on its own is left to the load."""
    path, name = resolve_model(model)
    if tokenizer is not None:
        tok = read_tokenizer(resolve_model(tokenizer)[0])
    else:
        try:
            tok = read_tokenizer(path)
        except HerdError:
            return
    try:
        if task == "infill":
            infill_ids(tok, "", "")
            infill_stop_ids(tok)
        else:
            LlamaGuard3().encode(tok, [{"role": "user", "content": "?"}])
    except HerdError as e:
        verb, needs = _NEEDS[task]
        raise HerdError(f"{name} cannot {verb} ({e}); it takes {needs}: download one, then pass -m PATH, or "
                        f"`herd import PATH NAME` it into the store once and pass -m NAME") from None


def load(model: str | Path | None = None, *, dtype: str | torch.dtype = "auto", device: str = "cpu",
         tokenizer: str | Path | None = None, quantize: str | None = None, group_size: int | None = None,
         tp: int = 1) -> LLM:
    """Load a model from a checkpoint path (HF directory, Meta directory, GGUF, llama2.c .bin, herd
    quantized directory) or a name in the model store; with no model, the built-in default (pulled
    on first use). quantize: None (or "keep") loads float weights in `dtype` and, on the CPU, runs a
    GGUF's quants as stored (llama.cpp's arithmetic); "dequant" dequantizes them to `dtype`; "int8" /
    "int4" quantizes (group_size inputs per scale). tokenizer: one to use instead of the
    checkpoint's: a tokenizer file or directory, or a model (path or store name) whose tokenizer to
    take, a GGUF's embedded vocabulary included.
    tp > 1: run the model over `tp` processes (herd.parallel), this one rank 0; under torchrun the
    other ranks serve this one from inside this call and exit when it stops."""
    check_device(device)  # before a pull or a load that would fail on it
    path, name = resolve_model(model)
    tok = None if tokenizer is None else read_tokenizer(resolve_model(tokenizer)[0])  # before the weights
    if tp > 1:
        if quantize not in (None, "dequant"):  # a GGUF's quants are dequantized on every rank
            raise HerdError("tensor parallelism runs float weights: --quantize cannot be combined with --tp")
        from herd import parallel  # torch.distributed only when asked for

        net, ckpt = parallel.load(path, tp, resolve_dtype(dtype, device), device)
    else:
        net, ckpt = load_model(path, resolve_dtype(dtype, device), device, quantize, group_size)
    tok = tok if tok is not None else ckpt.tokenizer
    if tok is None:
        raise HerdError(f"{path}: no tokenizer found beside the weights; pass one with tokenizer=PATH (--tokenizer)")
    if tok.vocab_size > ckpt.config.vocab_size:
        raise HerdError(f"tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {ckpt.config.vocab_size}")
    if ckpt.chat_template and tok.chat_template is None:
        tok.chat_template = ckpt.chat_template
    try:
        chat_format = chat_format_for(tok, ckpt.config.family)
    except HerdError:
        chat_format = None  # a base model: plain completion only; chat() says why it cannot
    return LLM(net, tok, chat_format, ckpt.eos_ids, name=name)
