"""Evaluation: perplexity with a sliding window, multiple-choice accuracy by log-likelihood, and
a backend for lm-evaluation-harness (`herd.eval.lm_eval_backend`, needs the `eval` extra)."""

from herd.eval.choice import ChoiceResult, Item, multiple_choice, read_items
from herd.eval.perplexity import Perplexity, perplexity
from herd.eval.scoring import score, token_logprobs

__all__ = ["ChoiceResult", "Item", "Perplexity", "multiple_choice", "perplexity", "read_items", "score",
           "token_logprobs"]
