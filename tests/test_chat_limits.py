"""A chat template is code from a checkpoint: rendering it is bounded in time and in the size of
what it builds, and a template that renders no prompt is a clear error, not a crash.

Each hostile template renders in a forked child with a deadline and 2 GB more address space
than the tests hold, so a template the limits miss fails its test, instead of hanging the suite
or exhausting the machine's memory."""

import multiprocessing
import re
import resource
import threading
import time

import pytest
import torch

from herd.errors import HerdError
from herd.generate import SamplingParams, Sequence
from herd.llm import LLM
from herd.model import Transformer
from herd.tokenizer import JinjaChat, sandbox
from helpers import tiny_config

MESSAGES = [{"role": "user", "content": "Hello!"}]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def _render_in_child(template: str, messages: list, out) -> None:
    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (held + (2 << 30), resource.RLIM_INFINITY))
    try:
        out.send({"text": JinjaChat(template).render(messages)})
    except BaseException as e:  # noqa: BLE001 - reported to the test
        out.send({"error": e})


def render_within(template: str, messages=MESSAGES, seconds: float = 5.0) -> dict:
    """{"text": ...} or {"error": ...} from rendering `template`, which must end within `seconds`."""
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    child = fork.Process(target=_render_in_child, args=(template, messages, send), daemon=True)
    child.start()
    send.close()  # so that a child that dies unheard ends the wait
    try:
        assert receive.poll(seconds), f"rendering ran past {seconds} s"
        return receive.recv()
    finally:
        child.kill()
        child.join()


def assert_refused(template: str, match: str, messages=MESSAGES) -> HerdError:
    error = render_within(template, messages).get("error")
    assert isinstance(error, HerdError), f"expected a HerdError, got {error!r}"
    assert error.__class__ is HerdError and "\n" not in str(error)
    assert match in str(error), str(error)
    return error


@pytest.fixture
def short_time_limit(monkeypatch):
    monkeypatch.setattr(sandbox, "TIME_LIMIT", 0.5)


TIMED = {
    "nested_loops": NESTED_LOOPS,
    "loop_filter": "{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}{% endfor %}{% endfor %}",
    "recursive_loop": "{% for x in range(100000) recursive %}{% if loop.depth < 3 %}{{ loop(range(100000)) }}"
                      "{% endif %}{% endfor %}",
    "exponential_macro": (
        "{% macro f(n) %}{% if n %}{% set a = f(n - 1) %}{% set b = f(n - 1) %}{% endif %}{% endmacro %}{{ f(60) }}"
    ),
    "generator": "{% for i in range(100000) %}{{ range(100000) | map('string') | map('length') | sum }}{% endfor %}",
}


@pytest.mark.parametrize("name", TIMED)
def test_rendering_stops_at_the_time_limit(short_time_limit, name):
    assert_refused(TIMED[name], "time limit of 0.5 s")


def test_the_limits_are_per_render_and_per_thread(short_time_limit):
    """One JinjaChat serves many threads, as in the server: the render that reaches its time
    limit in one thread stops only itself, and every render starts with a fresh budget."""
    chat = JinjaChat("{% if messages[0].content == 'spin' %}" + NESTED_LOOPS + "{% endif %}{{ messages[0].content }}")
    errors = []

    def spin():
        try:
            chat.render([{"role": "user", "content": "spin"}])
        except HerdError as e:
            errors.append(str(e))

    hostile = threading.Thread(target=spin, daemon=True)
    hostile.start()
    for _ in range(20):
        assert chat.render(MESSAGES) == "Hello!"
        time.sleep(0.05)
    hostile.join(5)
    assert not hostile.is_alive() and errors == ["chat template: rendering ran past the time limit of 0.5 s"]
    assert chat.render(MESSAGES) == "Hello!"


SIZED = {
    "string_repetition": "{{ 'x' * 10 ** 12 }}",
    "list_repetition": "{{ ['x' * 1000000] * 1000000 }}",
    "power": "{{ 7 ** 10000000000 }}",
    "number_growth": "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "concatenation": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "list_doubling": "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "join_filter": "{{ range(100000) | map('string') | join('y' * 1000000) }}",
    "join_method": "{{ ('y' * 1000000).join(range(100000) | map('string')) }}",
    "join_of_a_repeated_list": "{{ (['y' * 100000] * 100000) | join }}",
    "replace": "{{ ('x' * 1000000) | replace('', 'y' * 1000000) }}",
    "replace_method": "{{ ('x' * 1000000).replace('x', 'y' * 1000000) }}",
    "padding_method": "{{ 'x'.center(10 ** 12) }}",
    "padding_filter": "{{ 'x' | center(10 ** 12) }}",
    "padding_literal": "{{ 'x' | center(1000000000000) }}",
    "indent": "{{ ('x\n' * 1000000) | indent(1000000) }}",
    "printf_width": "{{ '%1000000000000s' % 'x' }}",
    "format_width": "{{ '{:>1000000000000}'.format('x') }}",
    "format_filter": "{{ '%1000000000000s' | format('x') }}",
    "batch": "{{ [1] | batch(10 ** 12, 'x') | list }}",
    "macro_output": "{% macro m() %}{% for i in range(100000) %}{% for j in range(100000) %}xxxx{% endfor %}"
                    "{% endfor %}{% endmacro %}{% set x = m() %}",
    "block_set": "{% set x %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}",
    "huge_output": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "shared_lists": "{% set ns = namespace(t=[]) %}{% for i in range(64) %}{% set ns.t = [ns.t, ns.t] %}{% endfor %}"
                    "{{ ns.t | tojson }}",
    "printed_list": "{% set s = 'y' * 1000000 %}{% set ns = namespace(l=[]) %}"
                    "{% for i in range(100000) %}{% set ns.l = ns.l + [s] %}{% endfor %}{{ ns.l }}",
}


@pytest.mark.parametrize("name", SIZED)
def test_what_a_template_builds_is_bounded(name):
    error = assert_refused(SIZED[name], "size limit")
    assert "4194304" in str(error) or "bits" in str(error)


def test_recursion_is_a_clear_error():
    assert_refused("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion limit")


def test_the_size_limit_grows_with_the_conversation():
    """A template may write several times its input: a long conversation is not refused."""
    long = [{"role": "user", "content": "word " * 2_000_000}]  # 10 MB, over the 4 MiB floor
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{{ m.content[:10] ~ '!' }}{% endfor %}"
    result = render_within(template, long)
    assert result["text"].startswith("<user>word word") and len(result["text"]) > 9_999_000
    error = assert_refused("{{ messages[0].content * 100 }}", "size limit", long)
    assert int(re.search(r"more than (\d+) characters", str(error))[1]) > 80_000_000  # 8 x its input


def test_real_templates_render_quickly_under_the_limits(shared):
    for name in ("meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct"):
        chat = JinjaChat(shared("chat_templates", name + ".jinja").read_text(encoding="utf-8"))
        messages = [{"role": "system", "content": "Be brief."}] + [
            {"role": ("user", "assistant")[i % 2], "content": f"message {i}"} for i in range(2000)
        ]
        start = time.monotonic()
        text = chat.render(messages)
        assert time.monotonic() - start < 2 and text.count("<|eot_id|>") == 2001


EMPTY = "{% for m in messages if m.role == 'nobody' %}{{ m.content }}{% endfor %}"


def test_a_template_that_renders_nothing_is_a_clear_error(llama3):
    from test_chat import _bare_hf_tokenizer

    for tokenizer in (llama3, _bare_hf_tokenizer()):  # with and without special tokens to mark
        with pytest.raises(HerdError, match="rendered an empty prompt"):
            JinjaChat(EMPTY).encode(tokenizer, MESSAGES)
    assert JinjaChat(EMPTY).render(MESSAGES) == ""  # rendering for display is not generating


def test_generation_refuses_an_empty_prompt(llama3):
    """Every way into generation: chat and stream_chat (through the template), and token ids
    given directly to LLM.sequences, which generate, infill and moderate go through."""
    torch.manual_seed(0)
    cfg = tiny_config("llama3", vocab_size=llama3.vocab_size)
    llm = LLM(Transformer(cfg).eval(), llama3, JinjaChat(EMPTY))
    with pytest.raises(HerdError, match="empty prompt"):
        llm.chat(MESSAGES, max_tokens=2)
    with pytest.raises(HerdError, match="empty prompt"):
        list(llm.stream_chat(MESSAGES, max_tokens=2))
    with pytest.raises(HerdError, match="prompt is empty"):
        llm.sequences([[]], SamplingParams(max_tokens=2), set())
    with pytest.raises(HerdError, match="prompt is empty"):
        Sequence([], SamplingParams(), None, set(), cfg.vocab_size, limit=2)


KITCHEN_SINK = """\
{% macro greet(name, punct='!') %}Hello {{ name }}{{ punct }}{% endmacro %}
{% macro wrap() %}[{{ caller() }}]{% endmacro %}
{% set ns = namespace(seen=[], text='') %}
{% for m in messages %}
{% set ns.seen = ns.seen + [m.role] %}{% set ns.text = ns.text ~ m.content[:3] %}
{{ loop.index }}/{{ loop.length }} {{ loop.cycle('odd', 'even') }}: {{ greet(m.role) }} {{ m.content | trim | upper }}
{% endfor %}
{% call wrap() %}{{ ns.seen | join(', ') }}|{{ ns.text }}{% endcall %}
{% filter upper %}{{ messages | map(attribute='role') | join('-') }}{% endfilter %}
{% set block %}{% for k, v in {'a': 1, 'b': [2, 3]} | dictsort %}{{ k }}={{ v }};{% endfor %}{% endset %}{{ block }}
{% for x in [[1, [2]], [3]] recursive %}({{ loop(x) if x is iterable else x }}){% endfor %}
{{ 'ab' * 3 }} {{ 2 ** 10 }} {{ 7 * 6 }} {{ [1] * 2 + [3] }} {{ (1, 2) + (3,) }} {{ '%05.1f|%-4s|' % (3.14159, 'x') }}
{{ '{:>6}|{:^5}|{}'.format('r', 'c', 10 ** 12) }} {{ 'x'.center(7, '*') }} {{ 'a\\nb' | indent(2, true) }}
{{ 'a b c' | replace(' ', '--') }} {{ 'abc'.replace('b', 'BB') }} {{ '-'.join(['x', 'y']) }} {{ 'hi' | center(6) }}
{{ '%s and %s' | format('a', 'b') }} {{ range(5) | batch(2, 0) | list }} {{ range(5) | slice(2) | list }}
{{ messages | tojson(indent=2) }} {{ messages | selectattr('role', 'equalto', 'user') | list | length }}
{{ range(3) | map('string') | join }} {{ messages | sum(attribute='n', start=10 ** 9) }} {{ 10 ** 12 }}
"""


def test_good_templates_render_as_jinja_renders_them():
    """Every construct the limits touch gives the plain sandbox's output when no limit is reached."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from herd.tokenizer.chat import _tojson

    messages = [{"role": "system", "content": " Be brief. ", "n": 1}, {"role": "user", "content": "Hi there", "n": 2}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    plain.filters["tojson"] = _tojson
    expected = plain.from_string(KITCHEN_SINK).render(messages=messages, tools=None, add_generation_prompt=True,
                                                      bos_token="", eos_token="")
    assert JinjaChat(KITCHEN_SINK).render(messages) == expected
    assert "Hello system!" in expected and "[system, user| BeHi ]" in expected and "((1)((2)))((3))" in expected
