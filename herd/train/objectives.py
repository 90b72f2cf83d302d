"""What a training step minimises. An objective maps (model, batch) to sums over the batch
(the loss and any statistics) and says how many units the batch holds (target tokens, or
preference pairs); the trainer divides by the count over the whole optimizer step on all
processes, so the result does not depend on how the step is split into micro-batches or ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from herd.train.data import IGNORE, Batches


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["tokens"], input_pos=batch.get("input_pos"), doc_ids=batch.get("doc_ids"))


class LanguageModeling:
    """Next-token cross-entropy on every target that is not IGNORE (pretraining and SFT)."""

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float((batch["targets"] != IGNORE).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = model(batch["tokens"], input_pos=batch.get("input_pos"), doc_ids=batch.get("doc_ids"),
                     targets=batch["targets"])  # fused with the classifier (herd.model.loss)
        return {"loss": loss}


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(target) over each row's targets: [rows]."""
    logits = _logits(model, batch).float()
    targets = batch["targets"]
    keep = targets != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1)


class DPO:
    """Direct Preference Optimization (Rafailov et al. 2023): with r = beta * (log pi(y|x) -
    log pi_ref(y|x)), minimise -log sigmoid(r_chosen - r_rejected). Batches carry the
    reference log-probabilities (`ref_chosen`, `ref_rejected`), computed once before training.
    Reported: the reward margin r_chosen - r_rejected, and how often it is positive."""

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float(len(batch["pair_ids"]))

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logps = sequence_logps(model, batch)
        n = len(batch["pair_ids"])
        chosen = self.beta * (logps[:n] - batch["ref_chosen"])
        rejected = self.beta * (logps[n:] - batch["ref_rejected"])
        margin = chosen - rejected
        return {"loss": -F.logsigmoid(margin).sum(), "reward_margin": margin.detach().sum(),
                "reward_accuracy": (margin > 0).float().sum(), "chosen_reward": chosen.detach().sum(),
                "rejected_reward": rejected.detach().sum()}


class WithReference:
    """Preference batches with the reference model's log-probabilities of every pair added:
    computed once, with `reference` (the model before training, or with its adapters off)."""

    def __init__(self, pairs: Batches, reference: Callable[[dict[str, torch.Tensor]], torch.Tensor], batch_size: int):
        self.pairs = pairs
        self.per_step = pairs.per_step
        n = pairs.n_pairs
        self.ref = torch.zeros(n, 2, dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, n, batch_size):
                ids = list(range(start, min(n, start + batch_size)))
                logps = reference(pairs.collate(ids)).double()
                self.ref[ids] = torch.stack((logps[: len(ids)], logps[len(ids):]), dim=1)

    def step_examples(self, step: int) -> list:
        return self.pairs.step_examples(step)

    def eval_examples(self, limit: int) -> list:
        return self.pairs.eval_examples(limit)

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        batch = self.pairs.collate(examples)
        ref = self.ref[batch["pair_ids"]].float()
        return {**batch, "ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}
