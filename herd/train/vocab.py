"""`herd train-tokenizer`: a SentencePiece BPE vocabulary with byte fallback, trained on text
files with the settings of Llama 1/2's tokenizer (digits split, no normalization, whitespace
kept, unknown characters spelled as bytes), written as a tokenizer directory herd loads."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import sentencepiece

from herd.errors import HerdError
from herd.tokenizer import SentencePieceTokenizer, Tokenizer

MIN_VOCAB = 256 + 3 + 1  # 256 byte pieces, unk/bos/eos, and at least one merge


def train_tokenizer(inputs: Sequence[str | Path], out_dir: str | Path, vocab_size: int = 4096,
                    max_sentences: int = 2_000_000, threads: int | None = None) -> Tokenizer:
    """Train on the lines of `inputs` (at most `max_sentences` of them, sampled) and write
    tokenizer.model + tokenizer_config.json into `out_dir`."""
    if vocab_size < MIN_VOCAB:
        raise HerdError(f"vocab size {vocab_size} is too small: byte fallback alone needs {MIN_VOCAB - 1}")
    files = [Path(p) for p in inputs]
    if not files:
        raise HerdError("train-tokenizer: no input files")
    for f in files:
        if not f.is_file():
            raise HerdError(f"{f}: no such file")
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            input=[str(f) for f in files], model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", character_coverage=0.99995, max_sentence_length=1 << 16,
            input_sentence_size=max_sentences, shuffle_input_sentence=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=threads or os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is too high (4096). Please set it to a value <= 1234."
        raise HerdError(f"train-tokenizer: {str(e).splitlines()[-1].strip()}") from None
    tok = SentencePieceTokenizer(model.getvalue(), str(out_dir))
    tok.save(out_dir)
    return tok
