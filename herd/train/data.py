"""Training data: corpora tokenized once into memory-mapped files, and the batches drawn from
them.

A prepared corpus is a directory:
  tokens.bin    every document's token ids, back to back (uint16, or uint32 past 65,536 tokens)
  offsets.bin   int64 start of each document, and the end of the last
  mask.bin      uint8, 1 where a token is a training target (SFT and preference data only)
  meta.json     kind, sizes and the train/validation split; written last, so a directory
                without it was never finished
  tokenizer/    the tokenizer the ids belong to

Kinds: "text" (pretraining: documents joined with BOS/EOS, loss on every token), "sft" (chat
`messages` or `prompt`/`completion` records, loss only on the reply), "preference" (each
`prompt`/`chosen`/`rejected` record is two documents, chosen then rejected, loss mask on the
replies). Validation is the tail of the corpus: whole documents, or the end of the token stream
when the corpus is a single document.

Every batch is a pure function of (seed, step), so resuming at a step continues the data exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from herd.errors import HerdError
from herd.tokenizer import ChatFormat, Tokenizer

FORMAT = "herd-corpus-1"
IGNORE = -100  # target id that carries no loss (cross_entropy's ignore_index)


# ---- records -> token ids ----

def _chat_ids(tok: Tokenizer, fmt: ChatFormat | None, messages: list, where: str) -> tuple[list[int], list[int]]:
    """Ids of a conversation and its mask: 1 on each assistant turn (its end-of-turn token
    included, so the model learns to stop), 0 elsewhere."""
    if fmt is None:
        raise HerdError(f"{where}: chat messages need a model with a chat format")
    if not isinstance(messages, list) or not messages:
        raise HerdError(f"{where}: 'messages' must be a non-empty list")
    ids = fmt.encode(tok, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        before = fmt.encode(tok, messages[:i], add_generation_prompt=True) if i else []
        upto = fmt.encode(tok, messages[: i + 1], add_generation_prompt=False)
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise HerdError(f"{where}: the chat template does not render turn by turn (an earlier turn "
                            "changes when later ones are added), so the assistant tokens cannot be found")
        mask[len(before) : len(upto)] = [1] * (len(upto) - len(before))
    if not any(mask):
        raise HerdError(f"{where}: no assistant message to learn from")
    return ids, mask


def _reply(value: Any, where: str, key: str) -> str:
    """A response given as a string or as [{"role": "assistant", "content": ...}]."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str):
        raise HerdError(f"{where}: '{key}' must be a string or a one-message assistant list")
    return value


def _prompt_reply(tok: Tokenizer, fmt: ChatFormat | None, prompt: Any, reply: str,
                  where: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids): a string prompt is plain text completed by the reply and EOS; a
    message list is a conversation answered by an assistant turn in the chat format."""
    if isinstance(prompt, str):
        p = tok.encode(prompt, bos=tok.add_bos)
        r = tok.encode(reply) + ([tok.eos_id] if tok.eos_id is not None else [])
        return p, r
    if isinstance(prompt, list):
        ids, mask = _chat_ids(tok, fmt, [*prompt, {"role": "assistant", "content": reply}], where)
        start = mask.index(1)
        return ids[:start], ids[start:]
    raise HerdError(f"{where}: 'prompt' must be a string or a list of chat messages")


def record_kind(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise HerdError(f"{where}: expected a JSON object")
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "messages" in record or "completion" in record:
        return "sft"
    if "text" in record:
        return "text"
    raise HerdError(f"{where}: a record needs 'text', 'messages', 'prompt'+'completion' or "
                    "'prompt'+'chosen'+'rejected'")


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """A pretraining document: BOS (when the tokenizer puts one first), text, EOS."""
    ids = tok.encode(text, bos=tok.add_bos)
    return ids + ([tok.eos_id] if tok.eos_id is not None else [])


def encode_record(record: dict, tok: Tokenizer, fmt: ChatFormat | None,
                  where: str) -> list[tuple[list[int], list[int] | None]]:
    """The documents of one record as (ids, mask); mask None means every token is a target."""
    kind = record_kind(record, where)
    if kind == "text":
        if not isinstance(record["text"], str):
            raise HerdError(f"{where}: 'text' must be a string")
        return [(encode_text(tok, record["text"]), None)]
    if kind == "sft":
        if "messages" in record:
            return [_chat_ids(tok, fmt, record["messages"], where)]
        if "prompt" not in record:
            raise HerdError(f"{where}: a 'completion' needs a 'prompt'")
        p, r = _prompt_reply(tok, fmt, record["prompt"], _reply(record["completion"], where, "completion"), where)
        return [(p + r, [0] * len(p) + [1] * len(r))]
    if "prompt" not in record or "chosen" not in record or "rejected" not in record:
        raise HerdError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected'")
    docs = []
    for key in ("chosen", "rejected"):
        p, r = _prompt_reply(tok, fmt, record["prompt"], _reply(record[key], where, key), where)
        docs.append((p + r, [0] * len(p) + [1] * len(r)))
    return docs


def read_records(path: Path, separator: str | None = None) -> Iterator[tuple[dict, str]]:
    """(record, where) of a .jsonl file (one JSON object per line) or a text file (one
    document, or one per `separator`)."""
    if not path.is_file():
        raise HerdError(f"{path}: no such file")
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line), f"{path}:{n}"
                    except json.JSONDecodeError as e:
                        raise HerdError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HerdError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = text.split(separator) if separator else [text]
    for i, doc in enumerate(docs):
        if doc.strip():
            yield {"text": doc}, f"{path} document {i + 1}"


# ---- prepared corpora on disk ----

@dataclass
class Split:
    """A range of documents (and tokens) of a corpus; `doc(i)` is (ids, mask or None)."""

    tokens: np.ndarray
    mask: np.ndarray | None
    offsets: np.ndarray  # [n_docs + 1] into tokens

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], None if self.mask is None else self.mask[a:b]

    def stream(self) -> np.ndarray:
        return self.tokens[int(self.offsets[0]) : int(self.offsets[-1])]


@dataclass
class Corpus:
    path: Path
    kind: str
    vocab_size: int
    train: Split
    val: Split | None

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def fingerprint(self) -> dict:
        return {"path": str(self.path.resolve()), "kind": self.kind, "train_tokens": self.train.n_tokens,
                "train_docs": self.train.n_docs}


def prepare_data(inputs: Sequence[str | Path], out_dir: str | Path, tokenizer: Tokenizer,
                 chat_format: ChatFormat | None = None, val_fraction: float = 0.05, separator: str | None = None,
                 progress: bool = True) -> Corpus:
    """Tokenize text / JSONL files into a prepared corpus directory (see the module docstring)."""
    if not inputs:
        raise HerdError("prepare-data: no input files")
    if not 0 <= val_fraction < 1:
        raise HerdError(f"val fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HerdError(f"{out}: already exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    kinds: set[str] = set()
    offsets, n_tokens, any_mask = [0], 0, False
    total = sum(Path(p).stat().st_size for p in inputs if Path(p).is_file())
    with open(out / "tokens.bin", "wb") as ft, open(out / "mask.bin", "wb") as fm, \
            tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for path in map(Path, inputs):
            before = n_tokens
            for record, where in read_records(path, separator):
                kinds.add(record_kind(record, where))
                for ids, mask in encode_record(record, tokenizer, chat_format, where):
                    np.asarray(ids, dtype=dtype).tofile(ft)
                    np.asarray(mask if mask is not None else [1] * len(ids), dtype=np.uint8).tofile(fm)
                    any_mask |= mask is not None
                    n_tokens += len(ids)
                    offsets.append(n_tokens)
                bar.set_postfix(tokens=n_tokens)
            bar.update(path.stat().st_size)
            if n_tokens == before:
                raise HerdError(f"{path}: no documents")
    kind = _corpus_kind(kinds)
    if not any_mask:
        (out / "mask.bin").unlink()
    np.asarray(offsets, dtype=np.int64).tofile(out / "offsets.bin")

    n_docs = len(offsets) - 1
    step = 2 if kind == "preference" else 1  # keep chosen/rejected pairs together
    val_docs = step * math.ceil(val_fraction * n_docs / step) if val_fraction else 0
    if kind == "text" and n_docs == 1:
        val_token = n_tokens - int(val_fraction * n_tokens)
        val_doc = 1
    else:
        if val_fraction and val_docs >= n_docs:
            raise HerdError(f"{n_docs // step} examples are too few to hold out {val_fraction:.0%} for validation")
        val_doc = n_docs - val_docs
        val_token = offsets[val_doc]
    tokenizer.save(out / "tokenizer")
    meta = {"format": FORMAT, "kind": kind, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
            "n_tokens": n_tokens, "n_docs": n_docs, "val_start_doc": val_doc, "val_start_token": val_token,
            "sources": [str(Path(p).resolve()) for p in inputs]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return load_corpus(out)


def _corpus_kind(kinds: set[str]) -> str:
    if "preference" in kinds and len(kinds) > 1:
        raise HerdError("preference records cannot be mixed with other kinds in one corpus")
    return "preference" if "preference" in kinds else "sft" if "sft" in kinds else "text"


def load_corpus(path: str | Path) -> Corpus:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise HerdError(f"{path}: not a prepared corpus (no meta.json; run `herd prepare-data`)")
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise HerdError(f"{meta_file}: unknown corpus format {meta.get('format')!r}")
        dtype = np.dtype(meta["dtype"])
        tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r")
        offsets = np.fromfile(path / "offsets.bin", dtype=np.int64)
        mask = np.memmap(path / "mask.bin", dtype=np.uint8, mode="r") if (path / "mask.bin").exists() else None
        n_tokens, n_docs = meta["n_tokens"], meta["n_docs"]
        vd, vt = meta["val_start_doc"], meta["val_start_token"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HerdError(f"{path}: damaged corpus ({type(e).__name__}: {e})") from None
    if len(tokens) != n_tokens or len(offsets) != n_docs + 1 or (mask is not None and len(mask) != n_tokens):
        raise HerdError(f"{path}: damaged corpus (file sizes disagree with meta.json)")
    if offsets[vd] != vt:  # a single document split inside
        train = Split(tokens, mask, np.array([0, vt]))
        val = Split(tokens, mask, np.array([vt, n_tokens])) if vt < n_tokens else None
    else:
        train = Split(tokens, mask, offsets[: vd + 1])
        val = Split(tokens, mask, offsets[vd:]) if vd < n_docs else None
    return Corpus(path, meta["kind"], meta["vocab_size"], train, val)


def corpus_from_records(records: Iterable[tuple[dict, str]], tokenizer: Tokenizer, chat_format: ChatFormat | None,
                        path: Path) -> Corpus:
    """An in-memory corpus (no validation split) from records, e.g. a small JSONL fine-tuning set."""
    ids, masks, offsets, kinds = [], [], [0], set()
    for record, where in records:
        kinds.add(record_kind(record, where))
        for doc, mask in encode_record(record, tokenizer, chat_format, where):
            ids += doc
            masks += mask if mask is not None else [1] * len(doc)
            offsets.append(len(ids))
    if not ids:
        raise HerdError(f"{path}: no records")
    split = Split(np.asarray(ids, dtype=np.int64), np.asarray(masks, dtype=np.uint8), np.asarray(offsets))
    return Corpus(path, _corpus_kind(kinds), tokenizer.vocab_size, split, None)


def open_data(path: str | Path, tokenizer: Tokenizer, chat_format: ChatFormat | None) -> Corpus:
    """A prepared corpus directory, or a JSONL / text file tokenized in memory."""
    path = Path(path)
    if path.is_dir():
        return load_corpus(path)
    return corpus_from_records(read_records(path), tokenizer, chat_format, path)


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `val` under the add-one-smoothed token frequencies of
    `train`: what a model that ignores context can reach, the bar pretraining must clear."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val, dtype=np.int64)].mean())


# ---- batches ----

class Batches(Protocol):
    """Examples of every optimizer step, the same on every process: `step_examples(step)` gives
    `per_step` examples, each process takes its share and `collate`s it to tensors;
    `eval_examples(limit)` is a fixed set for validation."""

    per_step: int

    def step_examples(self, step: int) -> list: ...

    def eval_examples(self, limit: int) -> list: ...

    def collate(self, examples: list) -> dict[str, torch.Tensor]: ...


class Windows(Batches):
    """Pretraining: random windows of seq_len + 1 tokens from the token stream."""

    def __init__(self, split: Split, seq_len: int, per_step: int, seed: int):
        self.tokens = split.stream()
        if len(self.tokens) < seq_len + 2:
            raise HerdError(f"{len(self.tokens)} tokens are too few for windows of {seq_len + 1}")
        self.seq_len, self.per_step, self.seed = seq_len, per_step, seed

    def step_examples(self, step: int) -> list[int]:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len - 1, self.per_step).tolist()

    def eval_examples(self, limit: int) -> list[int]:
        n = min(limit, max(1, len(self.tokens) // (self.seq_len + 1)))
        return np.linspace(0, len(self.tokens) - self.seq_len - 1, n).astype(int).tolist()

    def collate(self, starts: list[int]) -> dict[str, torch.Tensor]:
        rows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(rows)
        return {"tokens": t[:, :-1], "targets": t[:, 1:]}


def _doc_pair(split: Split, i: int, max_len: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(inputs, targets) of document i, cut to max_len; None if it has nothing to learn."""
    ids, mask = split.doc(i)
    ids = np.asarray(ids[: max_len + 1], dtype=np.int64)
    targets = ids[1:].copy()
    if mask is not None:
        targets[np.asarray(mask[1 : max_len + 1]) == 0] = IGNORE
    if len(ids) < 2 or (targets == IGNORE).all():
        return None
    return ids[:-1], targets


class Packed(Batches):
    """Supervised fine-tuning: documents shuffled each epoch and packed into rows of seq_len
    tokens. Each token carries its document id and its position within the document, so the
    model attends within documents only (no cross-document leakage) and positions restart."""

    def __init__(self, split: Split, seq_len: int, per_step: int, seed: int, pad_id: int = 0):
        self.split, self.seq_len, self.per_step, self.seed, self.pad_id = split, seq_len, per_step, seed, pad_id
        self.lengths = np.diff(split.offsets) - 1  # (inputs, targets) pairs are one shorter
        self.usable = [i for i in range(split.n_docs) if _doc_pair(split, i, seq_len) is not None]
        if not self.usable:
            raise HerdError("no document of the data has a training target")
        self._plans: dict[int, list[list[int]]] = {}

    @property
    def truncated(self) -> int:
        """How many documents are longer than a row and lose their end."""
        return int((self.lengths[self.usable] > self.seq_len).sum())

    def _pack(self, order: Iterable[int]) -> list[list[int]]:
        """Greedy packing in the given order: a document that does not fit starts a new row."""
        rows, row, used = [], [], 0
        for i in order:
            n = min(int(self.lengths[i]), self.seq_len)
            if used + n > self.seq_len:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += n
        return rows + [row]

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.usable)
            self._plans[epoch] = self._pack(order.tolist())
        return self._plans[epoch]

    def step_examples(self, step: int) -> list[list[int]]:
        out, index = [], step * self.per_step
        # Rows are numbered across epochs; find the epoch of `index` by walking the plans.
        epoch = 0
        while index >= len(self._plan(epoch)):
            index -= len(self._plan(epoch))
            epoch += 1
        while len(out) < self.per_step:
            plan = self._plan(epoch)
            out += plan[index : index + self.per_step - len(out)]
            index, epoch = 0, epoch + 1
        return out

    def eval_examples(self, limit: int) -> list[list[int]]:
        return self._pack(self.usable)[:limit]

    def collate(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        B, T = len(rows), self.seq_len
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        targets = torch.full((B, T), IGNORE, dtype=torch.long)
        positions = torch.zeros((B, T), dtype=torch.long)
        doc_ids = torch.full((B, T), -1, dtype=torch.long)
        for r, docs in enumerate(rows):
            at = 0
            for d in docs:
                x, y = _doc_pair(self.split, d, T)
                n = len(x)
                tokens[r, at : at + n] = torch.from_numpy(x)
                targets[r, at : at + n] = torch.from_numpy(y)
                positions[r, at : at + n] = torch.arange(n)
                doc_ids[r, at : at + n] = d
                at += n
        return {"tokens": tokens, "targets": targets, "input_pos": positions, "doc_ids": doc_ids}


class Pairs(Batches):
    """Preference pairs (documents 2k chosen, 2k+1 rejected), shuffled each epoch; a batch of
    B pairs is 2B rows, chosen rows first, right-padded to the longest."""

    def __init__(self, split: Split, seq_len: int, per_step: int, seed: int, pad_id: int = 0):
        if split.n_docs % 2:
            raise HerdError("preference data must hold chosen/rejected documents in pairs")
        self.split, self.seq_len, self.per_step, self.seed, self.pad_id = split, seq_len, per_step, seed, pad_id
        self.n_pairs = split.n_docs // 2

    def step_examples(self, step: int) -> list[int]:
        first = step * self.per_step
        epochs = range(first // self.n_pairs, (first + self.per_step - 1) // self.n_pairs + 1)
        order = np.concatenate([np.random.default_rng([self.seed, e]).permutation(self.n_pairs) for e in epochs])
        start = first - epochs[0] * self.n_pairs
        return order[start : start + self.per_step].tolist()

    def eval_examples(self, limit: int) -> list[int]:
        return list(range(min(limit, self.n_pairs)))

    def collate(self, pairs: list[int]) -> dict[str, torch.Tensor]:
        docs = [_doc_pair(self.split, 2 * p + k, self.seq_len) for k in (0, 1) for p in pairs]
        if any(d is None for d in docs):
            raise HerdError("a preference pair has an empty response")
        T = max(len(x) for x, _ in docs)
        tokens = torch.full((len(docs), T), self.pad_id, dtype=torch.long)
        targets = torch.full((len(docs), T), IGNORE, dtype=torch.long)
        for r, (x, y) in enumerate(docs):
            tokens[r, : len(x)] = torch.from_numpy(x)
            targets[r, : len(y)] = torch.from_numpy(y)
        return {"tokens": tokens, "targets": targets, "pair_ids": torch.tensor(pairs)}
