"""transformers' prefill and decode speed on random weights of a given shape, run by `herd bench`
as a script in a child process (python -P, peer_environment): it imports nothing of herd, so herd's
OpenMP settings never reach it.

    python -P hf_peer.py '{"config": {...LlamaConfig keywords}, "dtype": "float32", "prompt": 128,
                          "tokens": 64, "threads": 2}'
prints one JSON object: prefill and decode tok/s, peak RSS (MB), and the transformers and torch
versions.
"""

import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.generation.streamers import BaseStreamer


class Stamps(BaseStreamer):
    """The time each generated token arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    config = transformers.LlamaConfig(**spec["config"])
    hf = transformers.LlamaForCausalLM(config).to(getattr(torch, spec["dtype"])).eval()
    prompt, tokens = spec["prompt"], spec["tokens"]
    x = torch.randint(0, config.vocab_size, (1, prompt))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            t = time.perf_counter()
            hf(x, use_cache=True)
            best = min(best, time.perf_counter() - t)
        stamps = Stamps()
        hf.generate(x, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False, streamer=stamps,
                    pad_token_id=0)
    new = stamps.times[2:]  # the prompt, then the first token (prefill)
    return {"prefill": prompt / best, "decode": (len(new) - 1) / (new[-1] - new[0]), "rss": peak_rss_mb(),
            "build": f"transformers {transformers.__version__}, torch {torch.__version__}"}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
