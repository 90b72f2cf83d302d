"""Load test of an OpenAI-compatible server: for each concurrency level, that many clients each
send streaming chat requests back to back; reports aggregate output tokens/s, time to first
token (p50/p95) and time per output token after the first (p50/p95).

    python benchmarks/serve.py                      # starts `herd serve` on the default model
    python benchmarks/serve.py --model PATH         # ... on another model
    python benchmarks/serve.py --url http://127.0.0.1:8080 --served-model NAME   # an existing server
                                                     # (e.g. llama.cpp's llama-server)

Every request asks for exactly --max-tokens tokens (the end token is banned via logit_bias when
the server supports it, and the token count is taken from the stream's usage) so that servers
are compared on equal work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import httpx

PROMPTS = ["Write a story about a lighthouse keeper.", "Explain how rain forms.", "Describe a busy market.",
           "Give advice to a new gardener.", "Tell me about the history of bread.", "Describe the night sky."]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, ban: dict) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}, "logit_bias": ban}
    start = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(times)
    ttft = times[0] - start if times else float("nan")
    per_token = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else None
    return {"tokens": tokens, "ttft": ttft, "per_token": per_token}


async def level(url: str, model: str, concurrency: int, requests: int, max_tokens: int, ban: dict) -> dict:
    results = []

    async def client_loop(i: int, client: httpx.AsyncClient):
        for k in range(requests):
            results.append(await one_request(client, url, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens, ban))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(concurrency)))
        wall = time.perf_counter() - start
    per_token = [r["per_token"] for r in results if r["per_token"] is not None]
    ttft = [r["ttft"] for r in results]
    return {"concurrency": concurrency, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "tok_s": sum(r["tokens"] for r in results) / wall, "ttft_p50": percentile(ttft, 0.5),
            "ttft_p95": percentile(ttft, 0.95), "tpot_p50": percentile(per_token, 0.5),
            "tpot_p95": percentile(per_token, 0.95)}


def start_herd(args) -> tuple[subprocess.Popen, str]:
    port = args.port
    cmd = [sys.executable, "-m", "herd", "serve", "--port", str(port), "--max-batch", str(max(args.concurrency)),
           "--ctx", str(args.ctx)] + (["--model", args.model] if args.model else []) + (
           ["--quantize", args.quantize] if args.quantize else [])
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("herd serve did not start")
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model for herd serve (default: the default model)")
    p.add_argument("--url", help="benchmark this running server instead of starting herd serve")
    p.add_argument("--served-model", help="model name to send (default: the server's first /v1/models entry)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default: 2)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ctx", type=int, default=1024, help="herd serve --ctx (default: 1024)")
    p.add_argument("--port", type=int, default=8712)
    p.add_argument("--eos", type=int, action="append", default=[], help="token id to ban (repeatable)")
    p.add_argument("--quantize", choices=["int8", "int4", "keep"], help="herd serve --quantize (keep: run a "
                   "GGUF's quants as they are, as llama-server does)")
    args = p.parse_args()

    proc = None
    url = args.url
    if url is None:
        proc, url = start_herd(args)
    try:
        model = args.served_model or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        ban = {str(t): -100 for t in args.eos}
        asyncio.run(level(url, model, 1, 1, 4, ban))  # warm up
        print(f"{url} model={model} max_tokens={args.max_tokens} requests/client={args.requests}")
        print("concurrency  requests  out tok/s  TTFT p50  TTFT p95  per-token p50  per-token p95")
        for c in args.concurrency:
            r = asyncio.run(level(url, model, c, args.requests, args.max_tokens, ban))
            print(f"{c:11d}  {r['requests']:8d}  {r['tok_s']:9.1f}  {r['ttft_p50']:7.2f}s  {r['ttft_p95']:7.2f}s  "
                  f"{r['tpot_p50'] * 1000:11.0f}ms  {r['tpot_p95'] * 1000:11.0f}ms", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
