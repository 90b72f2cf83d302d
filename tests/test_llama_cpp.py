"""herd's greedy text on the default model (SmolLM2-135M-Instruct Q4_1) equals llama.cpp's on the
same GGUF file (#17 item 7), where llama.cpp is installed: its llama-simple (a greedy sampler) on
PATH or in $HERD_LLAMA_CPP. Both are asked for plain-text completions of the same prompts."""

import subprocess
import sys

import pytest

from herd.bench.peers import llama_cpp_binary, run_peer

PROMPTS = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):",
           "The three primary colors are", "Water boils at a temperature of"]
TOKENS = 32


@pytest.fixture(scope="module")
def llama_cpp_text(smollm2_gguf):
    """prompt -> llama.cpp's greedy continuation of it on the default model's file."""
    program = llama_cpp_binary("llama-simple")
    if program is None:
        pytest.skip("llama.cpp's llama-simple is neither on PATH nor in $HERD_LLAMA_CPP (a llama.cpp checkout "
                    "or its build/bin folder)")
    texts = {}
    for prompt in PROMPTS:
        r = run_peer([program, "-m", str(smollm2_gguf), "-n", str(TOKENS), prompt], timeout=300)
        assert r.returncode == 0 and r.stdout.startswith(prompt), r.stderr[-2000:]
        texts[prompt] = r.stdout[len(prompt):].removesuffix("\n")  # it echoes the prompt, ends with a newline
    return texts


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_herd_generate_greedy_text_equals_llama_cpp(prompt, smollm2_gguf, llama_cpp_text):
    r = subprocess.run([sys.executable, "-m", "herd", "generate", "-m", str(smollm2_gguf), "--temperature", "0",
                        "--max-tokens", str(TOKENS), prompt], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.removesuffix("\n") == llama_cpp_text[prompt]


def test_greedy_text_equals_llama_cpp(smollm2_llm, llama_cpp_text):
    """The same comparison in one process (herd.load's defaults are herd generate's)."""
    herd = {p: smollm2_llm.generate(p, max_tokens=TOKENS, temperature=0.0) for p in PROMPTS}
    assert herd == llama_cpp_text
