"""Continuous batching: requests join the running batch between decode steps and leave it when
done. One thread runs the model; callers submit requests and receive events through a callback.

Each loop iteration admits waiting requests into free slots, prefills up to `prefill_budget`
prompt tokens (in fixed chunks), then runs one decode step for every request past its prefill.

Exactness: a request's tokens do not depend on what else runs. Prefill runs one request at a
time in chunks aligned to multiples of `prefill_chunk`, so a reused prefix holds exactly the keys
and values a cold prefill would write; a decode step attends row by row (see SlotRows) and pads
the batch to a multiple of ROW_BLOCK rows, because the CPU matrix product rounds a row
differently when the row count is 1, 2, 3 or leaves a ragged tail (tests/test_engine.py checks
logits bit for bit). A model with the native decode step (herd.quant.forward, on by default on the
CPU) computes every row the same way whatever its neighbours, and skips the padding rows.

Speculative decoding (`drafter`: prompt lookup or a draft model, herd.generate.speculative): at
each decode step a request past its prefill drafts up to `draft_tokens` tokens; a request with
drafts is verified in a forward pass of its own ([last, d1..dk] at their positions in its slot),
and the requests without drafts share the usual batched step. Own passes because the rows' draft
lengths differ, the torch forward attends several tokens of only one row at a time (a prefill
chunk), and the native step takes at most 16 tokens in all when rows have several. The accepted
tokens go one by one through the same sampling path as plain decoding (stops, limits, logprobs and
JSON constraints apply per token), and positions past them are simply written again later. With
the native step every verified token's logits are bit for bit those of a plain decode step, so
greedy output and logprobs are exactly those without speculation; sampled output keeps its
distribution. Each request gets its own drafter state (a draft model's cache follows that
request's tokens), so a seeded request's drafts, and so its output, do not depend on what else
runs or ran in its slot. A drafted row costs a forward pass of its own: speculation buys latency
when few requests run and costs throughput in a full batch.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from herd.engine.metrics import EngineMetrics
from herd.errors import HerdError
from herd.generate import SamplingParams, Sequence
from herd.generate.speculative import check, propose, verified
from herd.model import SlotCache
from herd.model.lora import set_adapters

ROW_BLOCK = 4


class QueueFull(HerdError):
    """The engine's waiting queue is full; try again later."""


class EngineStopped(HerdError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the likeliest tokens and their log-probabilities


@dataclass
class Event:
    """New output of one request: text made final by this step, the tokens sampled, their
    log-probabilities when asked for, and on the last event why it ended ("stop", "length",
    "cancelled", "error": `error` says what went wrong, "shutdown": the engine stopped first)."""

    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: set[int]
    on_event: Callable[[Event], None]  # called from the engine thread; must not block
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: and the k likeliest
    adapter: str | None = None  # the LoRA adapter (herd.model.lora) to decode with; None: the base model


@dataclass(eq=False)
class Handle:
    """A submitted request: `cancel()` it (from any thread); `seq` holds its tokens and text."""

    id: int
    request: Request
    seq: Sequence
    submitted: float
    slot: int | None = None
    prefilled: int = 0  # prompt tokens whose keys/values are in the slot
    last_token_time: float | None = None
    drafter: object = field(default=None, repr=False)  # this request's drafter (speculative decoding)
    cancelled: bool = field(default=False, repr=False)
    engine: Engine | None = field(default=None, repr=False)

    def cancel(self) -> None:
        if self.engine is not None:
            self.engine._cancel(self)


class Engine:
    """Serves `llm` (a herd.LLM) with up to `max_batch` requests at once, each with `ctx`
    positions of KV cache (default: the model's context, capped at 4096). `kv_memory` (bytes)
    caps the cache: fewer slots are made when `max_batch` of them would not fit. At most
    `max_queue` requests wait for a slot; more get QueueFull. `drafter` (PromptLookup or
    DraftModel, see herd.generate.speculative.make_drafter): decode speculatively, drafting up to
    `draft_tokens` tokens per step."""

    def __init__(self, llm, max_batch: int = 8, ctx: int | None = None, kv_memory: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 32, prefill_budget: int = 128, drafter=None,
                 draft_tokens: int = 5):
        cfg = llm.config
        ctx = ctx or min(cfg.max_seq_len, 4096)
        for name, value in (("max_batch", max_batch), ("ctx", ctx), ("max_queue", max_queue),
                            ("prefill_chunk", prefill_chunk), ("prefill_budget", prefill_budget),
                            ("draft_tokens", draft_tokens)):
            if not isinstance(value, int) or value < 1:
                raise HerdError(f"{name} must be a positive integer, got {value!r}")
        if ctx > cfg.max_seq_len:
            raise HerdError(f"ctx {ctx} is longer than the model's context of {cfg.max_seq_len}")
        model = llm.model
        per_slot = cfg.kv_cache_bytes(ctx, model.dtype.itemsize)
        slots = max_batch if kv_memory is None else min(max_batch, int(kv_memory // per_slot))
        if slots < 1:
            raise HerdError(f"kv_memory of {kv_memory / 2**20:.0f} MiB holds no slot: one slot of {ctx} positions "
                            f"needs {per_slot / 2**20:.0f} MiB; lower ctx or raise kv_memory")
        self.llm = llm
        self.ctx = ctx
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self.cache = model.new_cache(slots, ctx, kind=SlotCache)  # a sharded model's holds its KV heads
        self.kv_bytes = per_slot * slots
        self.metrics = EngineMetrics()
        self._slot_prompt: list[list[int]] = [[] for _ in range(slots)]  # tokens whose KV a slot holds
        self._slot_adapter: list[str | None] = [None] * slots  # and the adapter that computed them
        self._slot_used = [0.0] * slots
        self._free = set(range(slots))
        self._waiting: collections.deque[Handle] = collections.deque()
        self._active: list[Handle] = []
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
        self._thread.start()

    @property
    def n_slots(self) -> int:
        return self.cache.batch_size

    # ---- the caller's side -------------------------------------------------------------------

    def submit(self, request: Request) -> Handle:
        """Queue `request`; raises HerdError for a bad request (prompt too long, bad schema),
        QueueFull when too many wait, EngineStopped during shutdown."""
        seq = self.llm.sequence(request.prompt_ids, request.params, request.stop_ids, self.ctx)
        handle = Handle(next(self._ids), request, seq, time.perf_counter(), engine=self)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            waiting = len(self._waiting) - len(self._free)  # those not about to take a free slot
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting; try again shortly")
            self._waiting.append(handle)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()
        return handle

    def _cancel(self, handle: Handle) -> None:
        with self._cond:
            handle.cancelled = True
            if handle in self._waiting:
                self._waiting.remove(handle)
                self.metrics.queue_depth.set(len(self._waiting))
                self.metrics.finished("cancelled")
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"slots": self.n_slots, "free_slots": len(self._free), "waiting": len(self._waiting),
                    "running": len(self._active)}

    def stop(self, timeout: float = 10.0) -> None:
        """End the engine thread; what is waiting or running ends with finish reason "shutdown"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the engine thread -------------------------------------------------------------------

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active):
                    self._cond.wait()
                if self._stopping:
                    for h in list(self._waiting) + self._active:
                        self._finish(h, Event("", [], finish_reason="shutdown"))
                    self._waiting.clear()
                    return
                self._admit()
            try:
                self._prefill()
                self._decode()
            except Exception as e:  # a bug or an exhausted machine: fail these requests, keep serving
                for h in list(self._active):
                    self._finish(h, Event("", [], finish_reason="error", error=f"{type(e).__name__}: {e}"))

    def _admit(self) -> None:
        """Move waiting requests into free slots (caller holds the lock); drop cancelled ones."""
        for h in [h for h in self._active if h.cancelled]:
            self._finish(h, None)
        while self._waiting and self._free:
            h = self._waiting.popleft()
            slot, reuse = self._pick_slot(h.seq.prompt_ids, h.request.adapter)
            self._free.remove(slot)
            self._slot_prompt[slot] = self._slot_prompt[slot][:reuse]
            self._slot_adapter[slot] = h.request.adapter
            h.slot, h.prefilled = slot, reuse
            h.drafter = None if self.drafter is None else self.drafter.fork()
            self._active.append(h)
            self.metrics.prefix_reused.inc(reuse)
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.running.set(len(self._active))

    def _pick_slot(self, prompt: list[int], adapter: str | None) -> tuple[int, int]:
        """The free slot holding the longest usable prefix of `prompt` (least recently used on a
        tie) and that prefix's length: whole chunks only, and never the last prompt token, whose
        logits are needed. Keys computed under another adapter are not reused."""
        best, best_reuse = None, -1
        for s in sorted(self._free, key=lambda s: self._slot_used[s]):
            held = self._slot_prompt[s] if self._slot_adapter[s] == adapter else []
            common = 0
            for a, b in zip(held, prompt[: len(prompt) - 1]):
                if a != b:
                    break
                common += 1
            reuse = common - common % self.prefill_chunk
            if reuse > best_reuse:
                best, best_reuse = s, reuse
        return best, best_reuse

    def _prefill(self) -> None:
        budget = self.prefill_budget
        model, device = self.llm.model, self.cache.k.device
        for h in [h for h in self._active if h.prefilled < len(h.seq.prompt_ids)]:
            prompt = h.seq.prompt_ids
            while budget > 0 and h.prefilled < len(prompt) and not h.cancelled:
                start = h.prefilled
                end = min(start - start % self.prefill_chunk + self.prefill_chunk, len(prompt))
                tokens = torch.tensor([prompt[start:end]], device=device)
                self._select_adapters([h])
                logits = model(tokens, torch.arange(start, end, device=device), self.cache.rows([h.slot]),
                               logits_at=torch.tensor([end - start - 1], device=device))
                h.prefilled, budget = end, budget - (end - start)
                if (end - start) == self.prefill_chunk:
                    self._slot_prompt[h.slot] = prompt[:end]
                self.metrics.prompt_tokens.inc(end - start)
                if end == len(prompt):
                    self._sample(h, logits[0, 0])
            if budget <= 0:
                break

    def _decode(self) -> None:
        rows = [h for h in self._active
                if h.prefilled == len(h.seq.prompt_ids) and h.seq.output_ids and not h.cancelled]
        if not rows:
            return
        if self.drafter is not None:
            drafted = [(h, *propose(h.seq, h.drafter, self.draft_tokens, self.ctx)) for h in rows]
            rows = [h for h, drafts, _ in drafted if not drafts]
            for h, drafts, qs in drafted:
                if drafts:
                    self._verify(h, drafts, qs)
            if not rows:
                return
        n = len(rows)
        padded = rows + rows[-1:] * (-n % ROW_BLOCK)
        device = self.cache.k.device
        tokens = torch.tensor([[h.seq.output_ids[-1]] for h in padded], device=device)
        positions = torch.tensor([[len(h.seq.prompt_ids) + len(h.seq.output_ids) - 1] for h in padded], device=device)
        self._select_adapters(padded)
        logits = self.llm.model(tokens, positions, self.cache.rows([h.slot for h in padded], n))[:n, 0]
        self.metrics.batch_size.observe(n)
        for h, row in zip(rows, logits):
            self._sample(h, row)

    def _verify(self, h: Handle, drafts: list[int], qs: list) -> None:
        """Check `h`'s drafts in one forward pass of its own and take what is accepted."""
        self._select_adapters([h])
        logits = check(self.llm.model, self.cache.rows([h.slot]), h.seq, drafts)
        self.metrics.batch_size.observe(1)
        self.metrics.draft_tokens.inc(len(drafts))
        self.metrics.verify_steps.inc()
        try:
            for i, token in enumerate(verified(h.seq, logits, drafts, qs)):
                if i < len(drafts) and token == drafts[i]:
                    self.metrics.draft_accepted.inc()
                if not self._take(h, token, logits[i]):
                    return
        except HerdError as e:
            self._finish(h, Event("", [], finish_reason="error", error=str(e)))

    def _select_adapters(self, rows: list[Handle]) -> None:
        """Each row of the next forward pass decodes with its request's adapter (when the model
        has adapters loaded: `herd serve --lora`)."""
        if self.llm.adapters:
            set_adapters(self.llm.model, [h.request.adapter for h in rows])

    def _sample(self, h: Handle, logits: torch.Tensor) -> None:
        try:
            token = h.seq.next_token(logits)
        except HerdError as e:
            self._finish(h, Event("", [], finish_reason="error", error=str(e)))
            return
        self._take(h, token, logits)

    def _take(self, h: Handle, token: int, logits: torch.Tensor) -> bool:
        """Append `token` (chosen from `logits`) to `h` and send it; False once `h` has ended."""
        seq = h.seq
        try:
            text = seq.append(token)
        except HerdError as e:
            self._finish(h, Event("", [], finish_reason="error", error=str(e)))
            return False
        now = time.perf_counter()
        if h.last_token_time is None:
            self.metrics.ttft.observe(now - h.submitted)
        else:
            self.metrics.token_latency.observe(now - h.last_token_time)
        h.last_token_time = now
        self.metrics.generation_tokens.inc()
        logprobs = None
        if h.request.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            top = torch.topk(lp, h.request.logprobs) if h.request.logprobs else None
            logprobs = [TokenLogprob(token, float(lp[token]),
                                     [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))]
        event = Event(text, [token], logprobs)
        if seq.finished:
            event.finish_reason = seq.finish_reason
            self._finish(h, event)
            return False
        h.request.on_event(event)
        return True

    def _finish(self, h: Handle, event: Event | None) -> None:
        """Free `h`'s slot and send its last event (none for a cancelled request: nobody listens)."""
        with self._cond:
            if h in self._active:
                self._active.remove(h)
                self._free.add(h.slot)
                self._slot_used[h.slot] = time.perf_counter()
                h.drafter = None  # a draft model's cache goes with it
                self.metrics.running.set(len(self._active))
        self.metrics.finished("cancelled" if event is None else event.finish_reason)
        if event is not None:
            h.request.on_event(event)
