"""The continuous-batching engine on the real SmolLM2-135M-Instruct: exactness alone vs batched,
prefix reuse, cancellation, queue bounds, seeds."""

import queue
import time

import pytest

from herd.engine import Engine, QueueFull, Request
from herd.errors import HerdError
from herd.generate import SamplingParams

TOPICS = ["cats", "dogs", "Paris", "the sea", "stars", "rain", "bread", "music", "trees", "snow", "bees", "ships",
          "clocks", "maps", "tea", "wolves"]


def chat_ids(llm, text):
    return llm.encode_chat([{"role": "user", "content": text}])


def stop_ids(llm):
    return llm.eos_ids | llm.chat_format.stop_ids(llm.tokenizer)


def submit(engine, llm, ids, logprobs=None, **params):
    q = queue.Queue()
    handle = engine.submit(Request(ids, SamplingParams(**params), stop_ids(llm), q.put, logprobs=logprobs))
    return handle, q


def collect(q, timeout=120):
    tokens, logprobs = [], []
    while True:
        ev = q.get(timeout=timeout)
        tokens += ev.tokens
        logprobs += [(t.token, t.logprob, t.top) for t in ev.logprobs or []]
        if ev.finish_reason:
            return tokens, logprobs, ev.finish_reason


def sample(engine, name, **labels):
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def run_all(engine, llm, prompts, **params):
    pending = [submit(engine, llm, ids, **params)[1] for ids in prompts]
    return [collect(q) for q in pending]


@pytest.fixture(scope="module")
def engine(smollm2_llm):
    e = Engine(smollm2_llm, max_batch=16, ctx=512)
    yield e
    e.stop()


def test_greedy_output_is_the_same_alone_and_in_a_batch_of_16(engine, smollm2_llm):
    llm = smollm2_llm
    prompts = [chat_ids(llm, f"Tell me one fact about {t}.") for t in TOPICS]
    # logprobs of the top 5 at every step: equal floats mean bit-identical logits, not just tokens
    alone = [run_all(engine, llm, [p], max_tokens=6, temperature=0, logprobs=5)[0] for p in prompts]
    together = run_all(engine, llm, prompts, max_tokens=6, temperature=0, logprobs=5)
    assert together == alone
    assert len({tuple(t) for t, _, _ in together}) > 8  # the prompts really differ
    assert sample(engine, 'herd_batch_size_sum') > sample(engine, 'herd_batch_size_count')  # ran batched


def test_a_reused_prompt_prefix_gives_the_same_output_as_a_cold_start(smollm2_llm):
    llm = smollm2_llm
    history = [{"role": "user", "content": "Name three colours of the rainbow and say why the sky is blue."},
               {"role": "assistant", "content": "Red, orange and yellow. The sky is blue because air scatters blue light."}]
    first = llm.encode_chat(history[:1])
    second = llm.encode_chat(history + [{"role": "user", "content": "And why are sunsets red?"}])
    warm = Engine(llm, max_batch=2, ctx=512, prefill_chunk=16)
    cold = Engine(llm, max_batch=2, ctx=512, prefill_chunk=16)
    try:
        run_all(warm, llm, [first], max_tokens=2, temperature=0)
        reused_before = sample(warm, 'herd_prefix_reused_tokens_total')
        out_warm = run_all(warm, llm, [second], max_tokens=8, temperature=0, logprobs=3)
        reused = sample(warm, 'herd_prefix_reused_tokens_total') - reused_before
        out_cold = run_all(cold, llm, [second], max_tokens=8, temperature=0, logprobs=3)
    finally:
        warm.stop()
        cold.stop()
    assert reused >= len(first) - 16 and reused % 16 == 0
    assert sample(cold, 'herd_prefix_reused_tokens_total') == 0
    assert out_warm == out_cold


def test_same_seed_same_sample_whatever_runs_beside_it(engine, smollm2_llm):
    llm = smollm2_llm
    ids = chat_ids(llm, "Write a short poem.")
    alone = run_all(engine, llm, [ids], max_tokens=8, temperature=1.0, seed=7)
    crowd = run_all(engine, llm, [ids, chat_ids(llm, "Hi"), ids, chat_ids(llm, "Count to five")],
                    max_tokens=8, temperature=1.0, seed=7)
    assert crowd[0] == alone[0] == crowd[2]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_cancel_frees_the_slot_at_once(engine, smollm2_llm):
    llm = smollm2_llm
    handle, q = submit(engine, llm, chat_ids(llm, "Tell me a long story."), max_tokens=400, temperature=0)
    q.get(timeout=60)  # it is running
    assert engine.stats()["free_slots"] == engine.n_slots - 1
    t = time.monotonic()
    handle.cancel()
    wait_for(lambda: engine.stats()["free_slots"] == engine.n_slots)
    assert time.monotonic() - t < 1.0
    assert sample(engine, "herd_requests_total", finish_reason="cancelled") >= 1


def test_the_queue_is_bounded(smollm2_llm):
    llm = smollm2_llm
    e = Engine(llm, max_batch=1, ctx=256, max_queue=1)
    try:
        ids = chat_ids(llm, "Hello")
        h1, q1 = submit(e, llm, ids, max_tokens=200, temperature=0)
        q1.get(timeout=60)  # h1 holds the only slot
        h2, _ = submit(e, llm, ids, max_tokens=4)  # waits
        with pytest.raises(QueueFull):
            submit(e, llm, ids, max_tokens=4)
        h2.cancel()  # leaving the queue makes room at once
        assert e.stats()["waiting"] == 0
        h3, q3 = submit(e, llm, ids, max_tokens=2, temperature=0)
        h1.cancel()
        assert collect(q3)[2] == "length"
    finally:
        e.stop()


def test_bad_requests_and_settings_are_one_line_errors(smollm2_llm):
    llm = smollm2_llm
    e = Engine(llm, max_batch=1, ctx=64)
    try:
        with pytest.raises(HerdError, match="prompt is 100 tokens but the context is 64"):
            submit(e, llm, [1] * 100)
        with pytest.raises(HerdError, match="not a valid JSON schema"):
            submit(e, llm, [1, 2], json_schema={"type": "nope"})
    finally:
        e.stop()
    with pytest.raises(HerdError, match="kv_memory .* holds no slot"):
        Engine(llm, max_batch=4, ctx=512, kv_memory=1 << 20)
    with pytest.raises(HerdError, match="ctx 100000 is longer than the model's context"):
        Engine(llm, ctx=100000)
