"""A model backend for EleutherAI's lm-evaluation-harness: any of its tasks, run on a herd model.

    herd-lm-eval --model herd --model_args pretrained=PATH --tasks hellaswag

`herd-lm-eval` (a console-script entry point of this package; also `python -m
herd.eval.lm_eval_backend`) is lm-eval's own command line with the "herd" model registered:
lm-eval 0.4 does not discover model plugins, so a plain `lm_eval --model herd` cannot find a
backend that lives outside its source tree. From Python, importing this module registers it
(`lm_eval.simple_evaluate(model="herd", ...)`), or pass `HerdLM(llm=...)` as the model.

model_args: pretrained (path or store name; default the default model), dtype, device,
tokenizer, batch_size, max_length.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from herd.errors import HerdError
from herd.eval.scoring import score
from herd.generate import SamplingParams, run_batch
from herd.llm import load


@register_model("herd")
class HerdLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, dtype: str = "auto", device: str = "cpu",
                 tokenizer: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_batch_size: int | None = None, llm=None):
        super().__init__()
        if llm is None:
            if device.startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # lm-eval's default device is cuda; its HF backend falls back the same way
            llm = load(pretrained, dtype=dtype, device=device, tokenizer=tokenizer)
        self.llm = llm
        self.tok = llm.tokenizer
        self._batch_size = 8 if batch_size == "auto" else int(batch_size)
        self._max_length = int(max_length or llm.config.max_seq_len)

    @property
    def eot_token_id(self) -> int:
        if self.tok.eos_id is None:
            raise HerdError("lm-eval needs an end-of-text token and this tokenizer has none")
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS where the model has one."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return type(self.tok).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """BOS first when the model expects it (unless add_special_tokens=False)."""
        bos = self.tok.add_bos and add_special_tokens is not False
        return self.tok.encode(string, bos=bos)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = score(self.llm.model, [(context, continuation) for _, context, continuation in requests],
                        self._batch_size, self._max_length)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of the model's context (lm-eval's rule)."""
        out = []
        for (text,) in (req.args for req in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length, context_len=1)]
            total = sum(lp for lp, _ in score(self.llm.model, windows, self._batch_size, self._max_length))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless the task asks for sampling; a prompt too long for the context keeps its
        end; requests with the same settings share a batch."""
        groups: dict[str, list[int]] = defaultdict(list)
        args = [req.args for req in requests]
        for i, (_, gen_kwargs) in enumerate(args):
            groups[repr(sorted(gen_kwargs.items()))].append(i)
        out = [""] * len(args)
        for indices in groups.values():
            kwargs = args[indices[0]][1]
            until = kwargs.get("until") or []
            max_tokens = min(int(kwargs.get("max_gen_toks", 256)), self._max_length - 1)
            params = SamplingParams(max_tokens=max_tokens, stop=[until] if isinstance(until, str) else list(until),
                                    temperature=float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0)
            prompts = [self.tok_encode(args[i][0])[-(self._max_length - max_tokens):] for i in indices]
            seqs = self.llm.sequences(prompts, params, self.llm.eos_ids)
            for _ in run_batch(self.llm.model, seqs):
                pass
            for i, seq in zip(indices, seqs):
                out[i] = seq.text
                self.cache_hook.add_partial("generate_until", args[i], seq.text)
        return out


def main() -> None:
    """lm-eval's command line, with the herd backend registered."""
    from lm_eval.__main__ import cli_evaluate  # the command line's module, not needed to register the backend

    sys.argv[0] = "herd-lm-eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
